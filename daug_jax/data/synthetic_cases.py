"""The synthetic benchmark's case sampler: a phantom patient, its findings, labels and report.

`sample_case` draws everything about record ``(seed, index)`` except pixels: the anatomy, which
findings are present and how severe, where each one sits, what the report says and the labels the
CheXpert labeler reads from it.  `daug_jax.data.synthetic_render` draws the parameters; the
conventions (patient coordinates, labels, masks and sites) are in `daug_jax.data.synthetic`.

Every draw comes from one Generator per case, in a fixed order: changing the order of the draws
below changes every record after the change.
"""

from __future__ import annotations

import math

import numpy as np

from daug_jax.data.reports import write_report

CLASS_NAMES = ("No Finding", "Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Consolidation",
               "Atelectasis", "Lung Lesion")
LOCALIZED_CLASSES = CLASS_NAMES[1:]
MM_PER_UNIT = 210.0  # a ~31 cm thorax spans ~1.5 patient units

_P_NORMAL, _P_HEDGE = 0.34, 0.12  # studies with no finding; findings hedged in the report
_P_FINDING = {"Cardiomegaly": 0.26, "Pleural Effusion": 0.28, "Pneumothorax": 0.2,
              "Consolidation": 0.24, "Atelectasis": 0.26, "Lung Lesion": 0.22}
_SIGN, _SIDES = (-1.0, 1.0), ("right", "left")  # side 0: patient right = image left
_MENISCUS = 0.16  # how far an effusion's meniscus climbs the lateral chest wall
# Patient-to-patient variation: uniform ranges in patient units; lists are (right, left) sides.
_ANATOMY = dict(
    rot=(-0.06, 0.06), scale=(0.9, 1.03), tx=(-0.04, 0.04), ty=(-0.04, 0.04), bw=(0.9, 1.0),
    lc=[(0.4, 0.46)] * 2, rx=[(0.29, 0.33)] * 2, cy=(0.14, 0.2), ry=(0.88, 0.96), dk=(0.16, 0.24),
    dt=[(0.42, 0.52), (0.03, 0.08)], ctr=(0.38, 0.47), hcy=(0.33, 0.4), hq=(0.72, 0.85),
    htilt=(0.35, 0.6), hcx=(0.12, 0.17), mcx=(-0.01, 0.03), mw=(0.085, 0.11), rib_sp=(0.12, 0.14),
    rib_v0=(-0.95, -0.88), rib_t=(0.02, 0.026), bubble=(0, 1), contrast=(1.1, 1.3),
    bright=(0.0, 0.05), gamma=(0.85, 1.15), noise_sd=(0.008, 0.022))


# ----------------------------------------------------------------------------- patients
def _anatomy(rng: np.random.Generator) -> dict:
    x = iter(rng.random(32).tolist())  # one call for all: per-call overhead would dominate
    p = {k: [a + (b - a) * next(x) for a, b in r] if isinstance(r, list) else r[0] + (r[1] - r[0])
         * next(x) for k, r in _ANATOMY.items()}
    p["dt"][1] += p["dt"][0]  # the right hemidiaphragm sits higher than the left
    # Heart: an ellipse tilted apex-down to the patient's left, width = ctr x thoracic width.
    p["hcos"], p["hsin"] = c, s = math.cos(p["htilt"]), math.sin(p["htilt"])
    w = p["ctr"] * (sum(p["lc"]) + sum(p["rx"])) / 2
    p["hrx"] = w / math.sqrt(c * c + (p["hq"] * s) ** 2)
    p["hry"] = p["hq"] * p["hrx"]
    p["hcx"] = w - p["hcx"]  # right heart border 0.12-0.17 right of the midline
    p["hax"], p["hay"] = p["hcx"] - 0.55 * p["hrx"] * c, p["hcy"] - 0.55 * p["hrx"] * s  # base
    p["bubble"] = float(p["bubble"] < 0.7)  # gastric air under the left hemidiaphragm
    # Lung markings: per lung 4 waves in hilar polar coordinates (angular and radial frequency,
    # phase); consolidation texture: an 8 x 8 grid.
    p["ves"] = rng.random((2, 3, 4)) * [[[14], [6], [6.3]]] + [[[8], [-3], [0]]]
    p["patch"] = rng.random((8, 8))
    return p


def _heart_frame(p: dict, u, v) -> tuple:
    """Patient coordinates -> the heart's frame: origin at its base, x along its long axis."""
    c, s = p["hcos"], p["hsin"]
    return (u - p["hax"]) * c + (v - p["hay"]) * s, (v - p["hay"]) * c - (u - p["hax"]) * s


def _heart(p: dict, k) -> tuple:
    """(cx, cy, rx, ry), in the heart frame, of the heart enlarged k-fold about its base.

    Scaling about a point inside the ellipse nests the hearts (k1 < k2: inside) and moves the
    apex down and to the patient's left, as an enlarging left ventricle does.
    """
    return 0.55 * k * p["hrx"], 0.0, k * p["hrx"], k * p["hry"]


def _in_lung(p: dict, s: int, u: float, v: float, m: float) -> bool:
    """Whether (u, v) is in side s's lung as drawn (diseased), at least m from its edges."""
    cx, rx, wall = _SIGN[s] * p["lc"][s], p["rx"][s], m + p["ptx_d"][s]
    if ((u - cx) / (rx - wall)) ** 2 + abs((v - p["cy"]) / (p["ry"] - wall)) ** 3 >= 1:
        return False
    t = _SIGN[s] * (u - cx) / rx
    if v >= p["dt"][s] + p["dk"] * t * t * (1.0 if t > 0 else 0.35) - p["atl_e"][s] - m:
        return False
    hx, _, hrx, hry = _heart(p, p["card_k"])
    fu, fv = _heart_frame(p, u, v)
    if ((fu - hx) / (hrx + m)) ** 2 + (fv / (hry + m)) ** 2 <= 1:
        return False
    if abs(u - p["mcx"]) < p["mw"] + m and v < p["hcy"]:
        return False
    lat = min(max(_SIGN[s] * (u - cx) / rx, 0.0), 1.0)  # below the effusion's meniscus?
    return not (p["eff_a"][s] > 0 and v > p["dt"][s] - p["eff_h"][s] - _MENISCUS * lat * lat - m)


def _place(rng, p: dict, s: int, m: float, box=(-9, 9, -9, 9)):
    """Rejection-samples a point of side s's lung inside ``box`` (u0, u1, v0, v1), or None."""
    cx, rx = _SIGN[s] * p["lc"][s], p["rx"][s]
    u0, u1 = max(cx - rx, box[0] + m), min(cx + rx, box[1] - m)
    v0, v1 = max(p["cy"] - p["ry"], box[2] + m), min(p["dt"][s] + 0.2, box[3] - m)
    for a, b in rng.random((60, 2)).tolist():  # a fixed draw count keeps later draws aligned
        if _in_lung(p, s, u0 + (u1 - u0) * a, v0 + (v1 - v0) * b, m):
            return u0 + (u1 - u0) * a, v0 + (v1 - v0) * b
    return None


def _lobe_box(p: dict, s: int, lobe: str) -> tuple:
    """(u0, u1, v0, v1) of a lobe's projection on a PA film, fissures as the box edges."""
    cx, hilum = _SIGN[s] * p["lc"][s], p["cy"] - 0.06
    if lobe == "upper":  # the left upper lobe includes the lingula
        return -9, 9, -9, hilum + (0.1 if s else -0.02)
    if lobe == "middle":  # medial, between the hilum and the right heart border
        return cx - 0.05, 9, hilum, p["dt"][s] - 0.04
    return -9, 9, hilum + 0.04, 9  # lower lobes (behind the middle lobe and lingula on a PA film)


def _lobe_of(p: dict, s: int, u: float, v: float) -> str:
    """The lobe a point of side s's lung is reported in."""
    for lobe in ("upper", "middle")[: 2 - s]:
        u0, u1, v0, v1 = _lobe_box(p, s, lobe)
        if u0 <= u <= u1 and v0 <= v <= v1:
            return lobe
    return "lower"


# ----------------------------------------------------------------------------- findings
# Each ``_draw_*(rng, p, f)`` sets the parameters ``p`` that draw one finding and fills in ``f``,
# what the report will state about it (``f["sev"]``: 0 hedged, drawn faintly, to 3).  A finding
# that sets ``f["drawn"] = False`` found no room in this patient and is neither drawn nor reported.
def _uniform(rng, lo, hi):
    return lo + (hi - lo) * rng.random()


def _one_side(rng, q: float) -> list:
    """[side] with probability q, else both sides [0, 1]."""
    return [int(2 * rng.random())] if rng.random() < q else [0, 1]


def _draw_severities(rng) -> dict:
    """{class: severity} of the findings present; empty for a normal study."""
    present = {}
    if rng.random() >= _P_NORMAL:
        while not present:  # severity 0: hedged in the report, drawn faintly
            present = {c: 0 if rng.random() < _P_HEDGE else 1 + int(3 * rng.random())
                       for c, q in _P_FINDING.items() if rng.random() < q}
    return present


def _draw_cardiomegaly(rng, p: dict, f: dict) -> None:
    f["ctr"] = ctr = _uniform(rng, *[(0.5, 0.53), (0.54, 0.58), (0.58, 0.62),
                                     (0.62, 0.66)][f["sev"]])
    p["card_k"] = ctr / p["ctr"]


def _draw_volume_loss(rng, p: dict, f: dict) -> None:
    """Atelectasis, first part: volume loss (a raised hemidiaphragm) with the moderate+ grades."""
    f["sides"] = _one_side(rng, 1.0 if f["sev"] == 0 else 0.55)
    for s in f["sides"]:
        p["atl_e"][s] = _uniform(rng, *[(0, 0), (0, 0), (0.04, 0.07), (0.07, 0.1)][f["sev"]])
        p["atl_a"][s] = (0.4, 0.7, 0.8, 0.9)[f["sev"]]


def _costophrenic_angle(p: dict, s: int) -> tuple:
    return (_SIGN[s] * (p["lc"][s] + 0.7 * p["rx"][s]),
            p["dt"][s] + 0.5 * p["dk"] - p["atl_e"][s] - 0.05)


def _draw_effusion(rng, p: dict, f: dict) -> None:
    """Only where a costophrenic angle is left free by the heart."""
    free = [s for s in (0, 1) if _in_lung(p, s, *_costophrenic_angle(p, s), 0.02)]
    sides = [s for s in _one_side(rng, 1.0 if f["sev"] == 0 else 0.6) if s in free] or free[-1:]
    f.update(sides=sides, sevs={s: 1 + int(3 * rng.random()) for s in sides}, drawn=bool(sides))
    f["sevs"].update({s: f["sev"] for s in sides[:1]})
    for s, g in f["sevs"].items():  # fluid height above the dome top, elevation included
        h = _uniform(rng, *[(-0.1, -0.06), (-0.04, 0.04), (0.1, 0.18), (0.22, 0.3)][g])
        p["eff_h"][s] = h + p["atl_e"][s]
        p["eff_a"][s] = 0.45 if g == 0 else 0.9


def _draw_pneumothorax(rng, p: dict, f: dict) -> None:
    f["sides"] = _one_side(rng, 1.0 if f["sev"] == 0 else 0.9)
    for s in f["sides"]:
        p["ptx_d"][s] = _uniform(rng, *[(0.06, 0.08), (0.1, 0.14), (0.15, 0.2),
                                        (0.22, 0.28)][f["sev"]])


# Lobar and plate findings need room in the lung the others left: without it (rare) they are
# neither drawn nor reported, like an effusion with both costophrenic angles covered.
def _draw_consolidation(rng, p: dict, f: dict) -> None:
    s = int(rng.random() < 0.45)
    lobe = ("upper", "lower", "middle")[int(rng.random() * (3 - s))]  # no left middle lobe
    box, r = _lobe_box(p, s, lobe), (0.7, 0.8, 1.0, 1.2)[f["sev"]]
    at = _place(rng, p, s, 0.07, box)
    p.update(con_a=(0.35, 0.6, 0.75, 0.9)[f["sev"]] if at else 0.0, con_s=float(s),
             con_box=list(box), con_c=[*(at or (5.0, 5.0)), r * _uniform(rng, 0.12, 0.2),
                                       r * _uniform(rng, 0.1, 0.17)])
    f.update(lobe=f"{_SIDES[s]} {lobe} lobe", bronch=f["sev"] >= 2 and rng.random() < 0.5,
             drawn=at is not None)


def _draw_lesion(rng, p: dict, f: dict) -> None:
    s = int(2 * rng.random())
    r = _uniform(rng, *[(0.045, 0.052), (0.056, 0.07), (0.07, 0.085), (0.085, 0.11)][f["sev"]])
    at = _place(rng, p, s, r)
    p.update(les_a=(0.4 if f["sev"] == 0 else 0.75) if at else 0.0, les_s=float(s),
             les_c=[*(at or (5.0, 5.0)), r, _uniform(rng, 0, 2 * math.pi)])
    f.update(lobe=f"{_SIDES[s]} {_lobe_of(p, s, *(at or (0, 0)))} lobe",
             mm=2 * r * MM_PER_UNIT, drawn=at is not None)


def _draw_plates(rng, p: dict, f: dict) -> None:
    """Atelectasis, second part: plates go last, below whatever else is in the lung base."""
    for s in list(f["sides"]):
        top = p["dt"][s] - p["atl_e"][s]
        at = _place(rng, p, s, 0.05, (-9, 9, top - 0.31, top - 0.05))
        p["atl_g"][s] = [*(at or (5.0, 5.0)), _uniform(rng, 0.12, 0.2),
                         _uniform(rng, 0.038, 0.048), _uniform(rng, -0.2, 0.2)]
        if at is None:
            p["atl_a"][s] = p["atl_e"][s] = 0.0
            f["sides"].remove(s)
    f.update(drawn=bool(f["sides"]), elevated=[s for s in f["sides"] if p["atl_e"][s] > 0])


# The order findings are drawn in: each is placed in the lung the earlier ones left.
_DRAW_ORDER = (("Cardiomegaly", _draw_cardiomegaly), ("Atelectasis", _draw_volume_loss),
               ("Pleural Effusion", _draw_effusion), ("Pneumothorax", _draw_pneumothorax),
               ("Consolidation", _draw_consolidation), ("Lung Lesion", _draw_lesion),
               ("Atelectasis", _draw_plates))


def sample_case(seed: int, index: int) -> dict:
    """Draws patient ``index`` of benchmark ``seed``: its parameters, labels and report.

    Returns {"p": {name: float, list or array}, "labels": int8 [C], "report": str, "id": str,
    "findings": {class: what the report states}, "noise_seed": int}.
    """
    rng = np.random.default_rng([seed, index])
    p = _anatomy(rng)
    p.update(card_k=1.0, eff_a=[0.0, 0.0], eff_h=[0.0, 0.0], ptx_d=[0.0, 0.0], atl_a=[0.0, 0.0],
             atl_e=[0.0, 0.0], atl_g=[[5.0, 5.0, 0.1, 0.0, 0.0]] * 2, con_a=0.0, con_s=0.0,
             con_c=[5.0, 5.0, 0.1, 0.1], con_box=[0.0] * 4, les_a=0.0, les_s=0.0,
             les_c=[5.0, 5.0, 0.1, 0.0])
    F = {c: dict(sev=sev) for c, sev in _draw_severities(rng).items()}  # what the report states
    for name, draw in _DRAW_ORDER:
        if name in F:
            draw(rng, p, F[name])
    F = {c: f for c, f in F.items() if f.get("drawn", True)}
    labels = np.zeros(len(CLASS_NAMES), np.int8)
    for c, f in F.items():
        labels[CLASS_NAMES.index(c)] = -1 if f["sev"] == 0 else 1
    labels[0] = int(not labels[1:].any())
    report = write_report(rng, F, LOCALIZED_CLASSES)
    return dict(p=p, labels=labels, findings=F, report=report, id=f"syn-{seed}-{index}",
                noise_seed=int(rng.random() * 2 ** 31))
