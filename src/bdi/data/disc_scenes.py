"""Seeded hard synthetic brake discs: a whole disc (hub, vent slots, friction ring) under varying light.

``bdi.data.synthetic`` paints easy discs that every detector scores perfectly; the scenes here are meant to tell a
better detector from a worse one (issue 29). A scene is a full disc seen from the front:

* hub: a dark centre bore, a bolt circle of round holes and the hub's edge (a dark step);
* vent band: radial slots between the hub and the friction ring;
* friction ring: concentric machining marks with a random period, phase and depth, plus a few fainter stray ones;
* lighting: a directional gradient (direction and strength vary per image), a soft highlight and sensor noise;
* pose: the disc's centre, radius and rotation are jittered per image.

Defects (``pit``, ``scratch``, ``crack``, ``chip``) are small and of low contrast, placed in one ROI (``ring``,
``vents`` or ``hub``) and, often, right next to a hole, a slot or an edge. Their mask is exact: a pixel is in
the mask if and only if painting the defect changed it. Each ROI has the ``shape`` object the GUI would send
(docs/contract.md "ROI mask"): an annulus about the disc's centre. Every random choice comes from the
``np.random.Generator`` passed in; :func:`draw_disc` is deterministic given a :class:`DiscScene`.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

ROIS = ("ring", "vents", "hub")
HARD_DEFECT_KINDS = ("pit", "scratch", "crack", "chip")
HOLE_LEVEL = 22.0  # grey level seen through the bore, bolt holes and slots, and around the disc
# defects stay this far inside their ROI's annulus (px at 256 px; scaled with the image, at least 1.5 px) so that
# the GUI's anti-aliased ROI mask of rounded centre and radii always holds them; a defect "on" an ROI's own edge
# is centred EDGE_INSET_PX inside it
ROI_INSET_PX = 2.0
EDGE_INSET_PX = 2.5
MIN_DEFECT_AREA_PX = 4  # a drawn defect smaller than this inside its ROI is drawn again elsewhere
MIN_SIZE_PX = 128  # below this the vent band is too narrow to hold a defect
ROI_CROP_MARGIN_PX = 2  # context kept around an ROI's bounding square in its crop


@dataclass(frozen=True)
class DiscLayout:
    """Where the disc lies in a ``size``×``size`` image; every radius is a fraction of ``r_outer``.

    Attributes:
        cx, cy: the disc's centre in px (jittered).
        r_outer: the friction ring's outer radius in px (jittered scale).
        rotation_rad: the angle of the first bolt hole and the first vent slot.
    """

    size: int
    cx: float
    cy: float
    r_outer: float
    rotation_rad: float
    n_bolts: int = 5
    n_slots: int = 24

    @property
    def r_bore(self) -> float:
        return 0.17 * self.r_outer

    @property
    def r_bolt_circle(self) -> float:
        return 0.28 * self.r_outer

    @property
    def r_bolt(self) -> float:
        return 0.05 * self.r_outer

    @property
    def r_hub(self) -> float:
        return 0.40 * self.r_outer

    @property
    def r_vent_inner(self) -> float:
        return 0.43 * self.r_outer

    @property
    def r_vent_outer(self) -> float:
        return 0.55 * self.r_outer

    @property
    def r_ring_inner(self) -> float:
        return 0.58 * self.r_outer

    def roi_radii(self, roi: str) -> tuple[float, float]:
        """(inner, outer) radius in px of an ROI's annulus."""
        radii = {"ring": (self.r_ring_inner, self.r_outer), "vents": (self.r_vent_inner, self.r_vent_outer),
                 "hub": (self.r_bore, self.r_hub)}
        if roi not in radii:
            raise ValueError(f"unknown ROI {roi!r}; choose from {ROIS}")
        return radii[roi]

    def roi_shape(self, roi: str) -> dict[str, float | str]:
        """The ``shape`` JSON object the GUI would send for ``roi`` (docs/contract.md "ROI mask"): an annulus."""
        r_inner, r = self.roi_radii(roi)
        return {"kind": "annulus", "cx": self.cx, "cy": self.cy, "r": r, "r_inner": r_inner}

    def bolt_centres(self) -> list[tuple[float, float]]:
        angles = self.rotation_rad + 2 * np.pi * np.arange(self.n_bolts) / self.n_bolts
        return [(self.cx + self.r_bolt_circle * float(np.cos(a)), self.cy + self.r_bolt_circle * float(np.sin(a)))
                for a in angles]

    def slot_angles(self) -> np.ndarray:
        return self.rotation_rad + 2 * np.pi * (np.arange(self.n_slots) + 0.5) / self.n_slots


@dataclass(frozen=True)
class DiscScene:
    """Everything random about one good disc image, drawn once by :func:`random_scene`."""

    layout: DiscLayout
    groove_period_px: float
    groove_phase_rad: float
    groove_depth: float  # grey levels, peak to peak
    stray_marks: tuple[tuple[float, float], ...]  # (radius px, depth in grey levels) of fainter single marks
    light_angle_rad: float
    light_gradient: float  # relative gain change across the disc's diameter
    highlight: tuple[float, float, float]  # (x px, y px, relative gain) of a soft specular spot
    noise_sigma: float
    noise_seed: int


@dataclass(frozen=True)
class DefectSpec:
    """One defect, as drawn: its kind, ROI, anchor point (px), size (px), direction and contrast (grey levels)."""

    kind: str
    roi: str
    x: float
    y: float
    size_px: float
    angle_rad: float
    contrast: float
    path_seed: int  # the crack's random walk


@dataclass(frozen=True)
class HardDisc:
    """One rendered disc.

    Attributes:
        image: (size, size, 3) uint8 BGR.
        mask: (size, size) uint8, 255 exactly where the defect changed the image, 0 elsewhere.
        scene: the good disc it was drawn from.
        defect: the defect painted on it, None for a good disc.
    """

    image: np.ndarray
    mask: np.ndarray
    scene: DiscScene
    defect: DefectSpec | None

    def roi_shape(self, roi: str) -> dict[str, float | str]:
        return self.scene.layout.roi_shape(roi)

    def roi_crop(self, roi: str) -> RoiCrop:
        """The canonical ROI crop the GUI sends to ``/infer`` (docs/contract.md): the annulus's bounding square
        about the disc's centre, ROI_CROP_MARGIN_PX wider on each side and clipped to the image, with the ROI's
        ``shape`` in the crop's pixel coordinates and the defect mask cut to the same window."""
        layout = self.scene.layout
        r_inner, r = layout.roi_radii(roi)
        height, width = self.image.shape[:2]
        x0 = max(0, int(np.floor(layout.cx - r - ROI_CROP_MARGIN_PX)))
        y0 = max(0, int(np.floor(layout.cy - r - ROI_CROP_MARGIN_PX)))
        x1 = min(width, int(np.ceil(layout.cx + r + ROI_CROP_MARGIN_PX)))
        y1 = min(height, int(np.ceil(layout.cy + r + ROI_CROP_MARGIN_PX)))
        shape: dict[str, float | str] = {"kind": "annulus", "cx": layout.cx - x0, "cy": layout.cy - y0, "r": r,
                                         "r_inner": r_inner}
        return RoiCrop(image=self.image[y0:y1, x0:x1], mask=self.mask[y0:y1, x0:x1], shape=shape, origin=(x0, y0))


@dataclass(frozen=True)
class RoiCrop:
    """One ROI's crop of a disc: the image and defect mask in that window, the ROI ``shape`` in its coordinates and
    the window's top-left corner (x, y) in the disc image."""

    image: np.ndarray
    mask: np.ndarray
    shape: dict[str, float | str]
    origin: tuple[int, int]


def random_scene(*, size: int, rng: np.random.Generator) -> DiscScene:
    """A good disc with jittered pose (centre ±4 %, radius 0.40–0.47 of the image) and random lighting."""
    r_outer = size * rng.uniform(0.40, 0.47)
    slack = size / 2 - r_outer - 1
    cx = size / 2 + float(np.clip(rng.normal(0, 0.02 * size), -slack, slack))
    cy = size / 2 + float(np.clip(rng.normal(0, 0.02 * size), -slack, slack))
    layout = DiscLayout(size=size, cx=cx, cy=cy, r_outer=r_outer, rotation_rad=rng.uniform(0, 2 * np.pi))
    stray = tuple((float(rng.uniform(layout.r_ring_inner, r_outer)), float(rng.uniform(4.0, 12.0)))
                  for _ in range(int(rng.integers(2, 6))))
    angle = rng.uniform(0, 2 * np.pi)
    return DiscScene(
        layout=layout,
        groove_period_px=size / rng.uniform(40.0, 60.0),
        groove_phase_rad=rng.uniform(0, 2 * np.pi),
        groove_depth=rng.uniform(8.0, 18.0),
        stray_marks=stray,
        light_angle_rad=angle,
        light_gradient=rng.uniform(0.15, 0.45),
        highlight=(cx + rng.uniform(-0.6, 0.6) * r_outer, cy + rng.uniform(-0.6, 0.6) * r_outer,
                   rng.uniform(0.0, 0.25)),
        noise_sigma=rng.uniform(2.0, 4.0),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def _polar(layout: DiscLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0 : layout.size, 0 : layout.size].astype(np.float32)
    return xx, yy, np.hypot(xx - layout.cx, yy - layout.cy), np.arctan2(yy - layout.cy, xx - layout.cx)


def _holes(layout: DiscLayout, radius: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """(H, W) bool: where there is no metal (outside, bore, bolt holes, vent slots)."""
    holes = (radius > layout.r_outer) | (radius < layout.r_bore)
    img = np.zeros((layout.size, layout.size), dtype=np.uint8)
    for bx, by in layout.bolt_centres():
        cv2.circle(img, (int(round(bx)), int(round(by))), int(round(layout.r_bolt)), 255, thickness=-1)
    pitch = 2 * np.pi / layout.n_slots
    offset = np.mod(angle - layout.slot_angles()[0] + pitch / 2, pitch) - pitch / 2  # to the nearest slot's axis
    in_band = (radius >= layout.r_vent_inner + 0.015 * layout.r_outer) & (
        radius <= layout.r_vent_outer - 0.015 * layout.r_outer)
    slots = in_band & (np.abs(offset) < 0.45 * pitch / 2)
    out: np.ndarray = holes | (img > 0) | slots
    return out


def _albedo(scene: DiscScene, radius: np.ndarray) -> np.ndarray:
    """(H, W) float32 surface grey levels before lighting: hub, vent band and the machined ring."""
    layout = scene.layout
    albedo = np.full(radius.shape, 150.0, dtype=np.float32)
    albedo[radius <= layout.r_hub] = 118.0
    # the hub's edge: a dark step just outside the hub face, then the vent band's rim
    albedo[(radius > layout.r_hub) & (radius < layout.r_vent_inner)] = 70.0
    albedo[(radius >= layout.r_vent_inner) & (radius <= layout.r_vent_outer)] = 132.0
    albedo[(radius > layout.r_vent_outer) & (radius < layout.r_ring_inner)] = 95.0
    ring = radius >= layout.r_ring_inner
    grooves = np.sin(2 * np.pi * radius / scene.groove_period_px + scene.groove_phase_rad)
    albedo[ring] += (0.5 * scene.groove_depth * grooves)[ring]
    for r_mark, depth in scene.stray_marks:
        albedo -= (depth * np.exp(-0.5 * ((radius - r_mark) / 0.8) ** 2)).astype(np.float32) * ring
    return albedo


def _lighting(scene: DiscScene, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """(H, W) float32 relative gain: a directional gradient across the disc and a soft highlight."""
    layout = scene.layout
    along = ((xx - layout.cx) * np.cos(scene.light_angle_rad) + (yy - layout.cy) * np.sin(scene.light_angle_rad))
    gain = 1.0 + scene.light_gradient * along / (2 * layout.r_outer)
    hx, hy, strength = scene.highlight
    spot = np.exp(-((xx - hx) ** 2 + (yy - hy) ** 2) / (2 * (0.35 * layout.r_outer) ** 2))
    out: np.ndarray = (gain + strength * spot).astype(np.float32)
    return out


def _inset_px(layout: DiscLayout, px_at_256: float) -> float:
    return max(1.5, px_at_256 * layout.size / 256.0)


def _roi_band(layout: DiscLayout, roi: str, radius: np.ndarray) -> np.ndarray:
    """(H, W) bool: the ROI's annulus shrunk on each side (ROI_INSET_PX), where its defects may lie."""
    r_inner, r = layout.roi_radii(roi)
    inset = _inset_px(layout, ROI_INSET_PX)
    return (radius >= r_inner + inset) & (radius <= r - inset)


def _anchor(layout: DiscLayout, roi: str, rng: np.random.Generator) -> tuple[float, float, str]:
    """A defect's anchor point and what it sits next to (``edge`` means on the rim of a hole or an edge)."""
    r_inner, r_outer = layout.roi_radii(roi)
    where = rng.choice(["open", "edge"], p=[0.4, 0.6])
    if roi == "hub" and where == "edge" and rng.uniform() < 0.6:
        bx, by = layout.bolt_centres()[int(rng.integers(layout.n_bolts))]
        a = rng.uniform(0, 2 * np.pi)
        return bx + layout.r_bolt * float(np.cos(a)), by + layout.r_bolt * float(np.sin(a)), "edge"
    if roi == "vents" and where == "edge":
        a = float(rng.choice(layout.slot_angles())) + rng.choice([-1.0, 1.0]) * np.pi / layout.n_slots * 0.45
        rr = rng.uniform(r_inner + 0.02 * layout.r_outer, r_outer - 0.02 * layout.r_outer)
        return layout.cx + rr * float(np.cos(a)), layout.cy + rr * float(np.sin(a)), "edge"
    a = rng.uniform(0, 2 * np.pi)
    # an ROI's own edge: just inside the band where defects may lie (_roi_band)
    inset = _inset_px(layout, EDGE_INSET_PX)
    rr = float(rng.choice([r_inner + inset, r_outer - inset])) if where == "edge" \
        else rng.uniform(r_inner, r_outer)
    return layout.cx + rr * float(np.cos(a)), layout.cy + rr * float(np.sin(a)), str(where)


def random_defect(scene: DiscScene, *, kind: str, roi: str, rng: np.random.Generator) -> DefectSpec:
    """A small, low-contrast defect of ``kind`` in ``roi``; a chip always sits on an edge or a hole's rim."""
    if kind not in HARD_DEFECT_KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {HARD_DEFECT_KINDS}")
    layout = scene.layout
    x, y, where = _anchor(layout, roi, rng)
    while kind == "chip" and where != "edge":
        x, y, where = _anchor(layout, roi, rng)
    unit = layout.size / 256.0
    sizes = {"pit": (3.0, 5.0), "scratch": (14.0, 28.0), "crack": (6.0, 10.0), "chip": (3.5, 6.0)}
    contrasts = {"pit": (-75.0, -45.0), "scratch": (40.0, 65.0), "crack": (-75.0, -45.0), "chip": (0.0, 0.0)}
    return DefectSpec(kind=kind, roi=roi, x=float(x), y=float(y), size_px=float(rng.uniform(*sizes[kind]) * unit),
                      angle_rad=float(rng.uniform(0, 2 * np.pi)), contrast=float(rng.uniform(*contrasts[kind])),
                      path_seed=int(rng.integers(0, 2**31 - 1)))


def _defect_stroke(spec: DefectSpec, size: int) -> np.ndarray:
    """(size, size) uint8 255 where ``spec`` is drawn, before it is cut to its ROI's metal."""
    stroke = np.zeros((size, size), dtype=np.uint8)
    centre = (int(round(spec.x)), int(round(spec.y)))
    if spec.kind in ("pit", "chip"):
        cv2.circle(stroke, centre, max(1, int(round(spec.size_px))), 255, thickness=-1)
    elif spec.kind == "scratch":
        dx, dy = np.cos(spec.angle_rad) * spec.size_px / 2, np.sin(spec.angle_rad) * spec.size_px / 2
        cv2.line(stroke, (int(round(spec.x - dx)), int(round(spec.y - dy))),
                 (int(round(spec.x + dx)), int(round(spec.y + dy))), 255, thickness=max(1, round(size / 128)))
    else:  # crack: a short random walk that keeps its heading
        walk = np.random.default_rng(spec.path_seed)
        points, heading = [np.array([spec.x, spec.y])], spec.angle_rad
        for _ in range(int(round(spec.size_px))):
            heading += walk.normal(0, 0.5)
            points.append(points[-1] + 1.5 * np.array([np.cos(heading), np.sin(heading)]))
        cv2.polylines(stroke, [np.round(np.array(points)).astype(np.int32)], False, 255, thickness=1)
    return stroke


def draw_disc(scene: DiscScene, defect: DefectSpec | None = None) -> HardDisc:
    """Render ``scene`` (and ``defect`` on it). Deterministic: the same arguments give the same pixels.

    A defect changes the surface before the light falls on it: a pit, scratch or crack adds its ``contrast`` to
    the metal it covers, a chip turns the metal it covers into a hole. Only metal inside the defect's ROI (shrunk
    by ROI_INSET_PX) is touched, and the mask is exactly the pixels that changed.
    """
    layout = scene.layout
    xx, yy, radius, angle = _polar(layout)
    holes = _holes(layout, radius, angle)
    albedo = _albedo(scene, radius)
    mask = np.zeros((layout.size, layout.size), dtype=np.uint8)
    if defect is not None:
        touched = (_defect_stroke(defect, layout.size) > 0) & ~holes & _roi_band(layout, defect.roi, radius)
        if defect.kind == "chip":
            holes = holes | touched
        else:
            albedo[touched] += np.float32(defect.contrast)  # stays float32: the clean render's rounding
        mask[touched] = 255
    noise = np.random.default_rng(scene.noise_seed).normal(0.0, scene.noise_sigma, size=albedo.shape)
    lit = albedo * _lighting(scene, xx, yy) + noise
    lit[holes] = HOLE_LEVEL + noise[holes] * 0.3
    gray = np.clip(np.round(lit), 0, 255).astype(np.uint8)
    if defect is not None:  # keep the mask exact: a pixel whose rounded value did not move is not in it
        clean = draw_disc(scene).image[..., 0]
        mask[gray == clean] = 0
    return HardDisc(image=cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), mask=mask, scene=scene, defect=defect)


def make_hard_disc(
    *, size: int = 256, defect: str | None = None, roi: str = "ring", rng: np.random.Generator
) -> HardDisc:
    """One hard disc; with ``defect`` (a kind of HARD_DEFECT_KINDS) it carries that defect inside ``roi``."""
    if roi not in ROIS:
        raise ValueError(f"unknown ROI {roi!r}; choose from {ROIS}")
    if size < MIN_SIZE_PX:
        raise ValueError(f"size must be at least {MIN_SIZE_PX} px, got {size}")
    scene = random_scene(size=size, rng=rng)
    if defect is None:
        return draw_disc(scene)
    for _ in range(50):
        disc = draw_disc(scene, random_defect(scene, kind=defect, roi=roi, rng=rng))
        if int((disc.mask > 0).sum()) >= MIN_DEFECT_AREA_PX:
            return disc
    raise RuntimeError(f"could not place a {defect} in the {roi} of this disc")  # pragma: no cover

