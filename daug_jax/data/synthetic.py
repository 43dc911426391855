"""The built-in benchmark: procedural PA chest radiographs with reports, labels and masks.

Each record is a frontal (PA) film of a phantom patient (soft tissue, lungs, heart, mediastinum,
trachea, spine, ribs, clavicles, diaphragm domes, lung markings, noise) with 0..6 findings drawn
where they develop in real films, a FINDINGS/IMPRESSION report, CheXpert-style labels, a mask per
finding and a *site* per localized class: where that finding would develop in this patient.
`generate` is the benchmark: `sample_case` draws all of a record but its pixels, `render` draws
its pixels, masks and sites.

Geometry.  Patient coordinates ``(u, v)`` span about [-1, 1], ``v`` pointing down and ``u < 0``
the patient's right, drawn on the image left (PA convention); shapes are posed (rotated, scaled,
shifted) into the image, so any ``image_size >= 32`` works.  Pixels come from a density map (soft
tissue, minus lung air, plus bone and findings) through a per-film contrast, brightness and
gamma, plus noise.

Labels.  1 = stated, -1 = hedged ("cannot exclude", "possible"), 0 = negated or not mentioned, as
the CheXpert labeler reads a report; "No Finding" is 1 exactly when no other class is 1 or -1.
Hedged findings are drawn faintly (what a radiologist hedges about) and have masks; masks are
all False where the label is 0.

Masks and sites, bool [C, H, W] ("No Finding": all False), cover every pixel a finding touches,
anti-aliased rim included; masks lie within their sites.  Cardiomegaly: the enlarged silhouette
over normal lung / the band between this patient's heart border and a heart of cardiothoracic
ratio 0.68.  Effusion: the fluid / the basal pleural spaces.  Pneumothorax: the pleural air / the
apical-lateral pleural spaces.  Consolidation, lung lesion: the opacity / the lung fields.
Atelectasis: the plate plus the lung lost to an elevated hemidiaphragm / the basal lungs.

Record ``i`` depends only on ``(seed, i)``: chunks or shards give the same records.  A case's
draws come from one Generator and the renderer sums the density map, each in a fixed order
(floating-point sums depend on it): reordering either changes every record after the change.

Reports.  A report names each drawn finding by its standard term or a standard synonym, with
severity and side, states some negatives with the usual negation cues and hedges uncertain
findings ("cannot exclude", "possible"), so that the CheXpert labeler's reading of the text gives
the record's labels.  Templates x synonyms x sentence order vary the phrasing so that retrieval
is not a string match.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Sequence

import chex
import numpy as np
import tqdm


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

_CTR_MAX, _EFF_MAX, _PTX_MAX, _BASE = 0.68, 0.44, 0.30, 0.46  # how far each class's site reaches
_AIR = 0.38  # density a full-thickness lung removes; findings refill a fraction of it
# Parameter values that draw a case without a finding (`render(..., drop=...)`).
_ABSENT = {"Cardiomegaly": {"card_k": 1.0}, "Pleural Effusion": {"eff_a": 0.0},
           "Pneumothorax": {"ptx_d": 0.0}, "Consolidation": {"con_a": 0.0},
           "Atelectasis": {"atl_a": 0.0, "atl_e": 0.0}, "Lung Lesion": {"les_a": 0.0}}


# ============================================================================= the case sampler
# ----------------------------------------------------------------------------- reports
_WORDS = {"Cardiomegaly": ("borderline", "mild", "moderate", "marked"),
          "Pleural Effusion": ("trace", "small", "moderate", "large"),
          "Pneumothorax": ("tiny", "small", "moderate", "large"),
          "Consolidation": ("faint", "patchy", "focal", "dense"),
          "Atelectasis": ("minimal", "minimal", "mild", "moderate"), "Lung Lesion": ("small",) * 4}
# Stated ("pos"; "pos2": bilateral, or a mass) and hedged phrasings, as str.format templates.
_TEMPLATES = {
    "Cardiomegaly": dict(
        pos=["{sev} cardiomegaly.", "the cardiac silhouette is {sev}ly enlarged.",
             "{sev} enlargement of the cardiac silhouette.",
             "heart size is {sev}ly enlarged, cardiothoracic ratio approximately {ctr:.2f}.",
             "enlarged cardiac silhouette (cardiothoracic ratio {ctr:.2f})."],
        hedge=["borderline heart size; cannot exclude mild cardiomegaly.",
               "possible mild cardiomegaly.",
               "the cardiac silhouette is possibly mildly enlarged."]),
    "Pleural Effusion": dict(
        pos=["{sev} {side} pleural effusion.", "there is a {sev} {side} pleural effusion.",
             "{sev} {side} effusion with a meniscus along the lateral chest wall.",
             "{side} pleural effusion, {sev} in size.",
             "blunting of the {side} costophrenic angle due to a {sev} pleural effusion."],
        pos2=["bilateral pleural effusions, {sev_r} on the right and {sev_l} on the left.",
              "{sev_l} left and {sev_r} right pleural effusions.",
              "bilateral effusions blunting both costophrenic angles, {sev_r} on the right and "
              "{sev_l} on the left."],
        hedge=["possible trace {side} pleural effusion.", "cannot exclude a trace {side} pleural "
               "effusion.", "minimal blunting of the {side} costophrenic angle may represent a "
               "trace effusion."]),
    "Pneumothorax": dict(
        pos=["{sev} {side} apical pneumothorax.", "{side} pneumothorax, {sev} in size.",
             "{sev} {side} pneumothorax with a visible visceral pleural line.",
             "there is a {sev} {side} apicolateral pneumothorax."],
        pos2=["bilateral {sev} apical pneumothoraces.", "{sev} bilateral pneumothoraces."],
        hedge=["cannot exclude a tiny {side} apical pneumothorax.", "possible tiny {side} apical "
               "pneumothorax.", "questionable {side} apical pleural line, possibly a tiny "
               "pneumothorax."]),
    "Consolidation": dict(
        pos=["{sev} {lobe} consolidation{bronch}.", "{sev} airspace opacity in the {lobe}.",
             "consolidation in the {lobe}{bronch}.", "{lobe} airspace disease.",
             "there is {sev} consolidation of the {lobe}{bronch}."],
        hedge=["possible early consolidation in the {lobe}.", "questionable subtle airspace "
               "opacity in the {lobe}.", "faint opacity in the {lobe} may represent early "
               "consolidation."]),
    "Atelectasis": dict(
        pos=["{kind} atelectasis at {base}.", "{sev} {basal} atelectasis.",
             "{basal} {kind} atelectasis.",
             "linear opacity at {base} consistent with atelectasis."],
        hedge=["possible minimal {basal} atelectasis.",
               "questionable subtle linear opacity at {base}, possibly atelectasis."]),
    "Lung Lesion": dict(
        pos=["{mm} mm nodule in the {lobe}.", "well-circumscribed {mm} mm nodule projecting over "
             "the {lobe}.", "a {mm} mm rounded opacity in the {lobe}, compatible with a pulmonary "
             "nodule.", "{lobe} pulmonary nodule measuring {mm} mm."],
        pos2=["{cm} cm mass in the {lobe}.", "a {cm} cm {lobe} mass.", "rounded {cm} cm mass "
              "projecting over the {lobe}.", "{lobe} lung lesion measuring {cm} cm, consistent "
              "with a mass."],
        hedge=["possible small nodule in the {lobe}.",
               "questionable nodular opacity in the {lobe}; cannot exclude a pulmonary nodule."]),
}
_NEGATIONS = {
    "Cardiomegaly": ["heart size is normal.", "the cardiac silhouette is within normal limits.",
                     "normal heart size.", "no cardiomegaly."],
    "Pleural Effusion": ["no pleural effusion.", "there is no pleural effusion.", "no effusion.",
                         "the costophrenic angles are sharp."],
    "Pneumothorax": ["no pneumothorax.", "there is no pneumothorax."],
    "Consolidation": ["no focal consolidation.", "no focal airspace opacity."],
    "Atelectasis": ["no atelectasis."],
    "Lung Lesion": ["no suspicious pulmonary nodule or mass.", "no focal nodule."],
}
_CLEAR = ["the lungs are clear.", "lungs are well expanded and clear.", "clear lungs."]
_OTHER = ["the mediastinal contours are normal.", "no acute osseous abnormality.",
          "osseous structures are intact.", "visualized upper abdomen is unremarkable."]
_NORMAL = ["no acute cardiopulmonary process.", "no acute cardiopulmonary abnormality.",
           "normal chest radiograph."]
_PREAMBLES = ["", "PA view of the chest. ", "PA and lateral views of the chest. ",
              "Frontal radiograph of the chest. ", "Comparison: none. "]
_LAYOUTS = [("FINDINGS: ", " IMPRESSION: "), ("Findings: ", "\nImpression: "),
            ("FINDINGS:\n", "\n\nIMPRESSION:\n")]


def _phrase(rng, cls: str, f: dict) -> list[str]:
    """Sentences stating (or, at severity 0, hedging) one finding."""
    pick = lambda xs: xs[int(rng.random() * len(xs))]  # noqa: E731
    sides, words, t = f.get("sides", [0]), _WORDS[cls], _TEMPLATES[cls]
    both, side = len(sides) == 2, _SIDES[sides[0]]
    fields = dict(sev=words[f["sev"]], side=side, lobe=f.get("lobe"), ctr=f.get("ctr", 0.0),
                  bronch=" with air bronchograms" if f.get("bronch") else "",
                  kind=pick(["plate-like", "linear", "subsegmental", "discoid"]),
                  basal="bibasilar" if both else f"{side} basilar",
                  base="both lung bases" if both else f"the {side} lung base",
                  mm=round(f.get("mm", 0)), cm=f"{f.get('mm', 0) / 10:.1f}")
    if f["sev"] == 0:
        out = [pick(t["hedge"])]
    elif cls == "Pleural Effusion" and both:
        fields["sev_r"], fields["sev_l"] = (words[f["sevs"][s]] for s in (0, 1))
        same = fields["sev_r"] == fields["sev_l"] and rng.random() < 0.7
        out = [pick(["{sev} bilateral pleural effusions.", "bilateral {sev} pleural effusions."]
                    if same else t["pos2"])]
    elif cls == "Pneumothorax" and both or cls == "Lung Lesion" and f["mm"] >= 30:
        out = [pick(t["pos2"])]
    else:
        out = [pick(t["pos"])]
    out += [pick(["elevation of the {0} hemidiaphragm with volume loss.", "elevated {0} "
                  "hemidiaphragm."]).format(_SIDES[s]) for s in f.get("elevated", [])]
    return [o.format(**fields) for o in out]


def write_report(rng, F: dict, classes: Sequence[str]) -> str:
    """A FINDINGS/IMPRESSION report: findings in varied words and order, some negatives.

    rng: the record's generator; F: {class name: finding parameters} of the drawn findings
    (severity 0 = hedged); classes: the localized class names, for the stated negatives.
    """
    pick = lambda xs: xs[int(rng.random() * len(xs))]  # noqa: E731
    body = [s for c, f in F.items() for s in _phrase(rng, c, f)]
    absent = [c for c in classes if c not in F]
    if {"Pleural Effusion", "Pneumothorax"} <= set(absent) and rng.random() < 0.5:
        body.append("no pleural effusion or pneumothorax.")
        absent = [c for c in absent if c not in ("Pleural Effusion", "Pneumothorax")]
    body += [pick(_NEGATIONS[c]) for c in absent
             if rng.random() < (0.15 if c == "Atelectasis" else 0.55)]
    if not set(F) - {"Cardiomegaly"} and rng.random() < 0.6:
        body.append(pick(_CLEAR))
    body += [s for s in _OTHER if rng.random() < 0.25]
    order = rng.permutation(len(body))
    stated_first = sorted(F, key=lambda c: F[c]["sev"] == 0)
    impression = [s for c in stated_first for s in _phrase(rng, c, F[c])]
    cap = lambda s: s[0].upper() + s[1:]  # noqa: E731
    if len(impression) > 1 and rng.random() < 0.35:
        impression = [f"{i + 1}. {cap(s)}" for i, s in enumerate(impression)]
    head, mid = pick(_LAYOUTS)
    return (pick(_PREAMBLES) + head + " ".join(cap(body[i]) for i in order) + mid
            + " ".join(cap(s) for s in impression or [pick(_NORMAL)]))


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
    """(cx, cy, rx, ry), in the heart frame, of the heart enlarged k-fold about its base: the
    hearts nest, the apex moving down and to the patient's left as a left ventricle enlarges."""
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
    f["ctr"] = ctr = rng.uniform(*[(0.5, 0.53), (0.54, 0.58), (0.58, 0.62), (0.62, 0.66)][f["sev"]])
    p["card_k"] = ctr / p["ctr"]


def _draw_volume_loss(rng, p: dict, f: dict) -> None:
    """Atelectasis, first part: volume loss (a raised hemidiaphragm) with the moderate+ grades."""
    f["sides"] = _one_side(rng, 1.0 if f["sev"] == 0 else 0.55)
    for s in f["sides"]:
        p["atl_e"][s] = rng.uniform(*[(0, 0), (0, 0), (0.04, 0.07), (0.07, 0.1)][f["sev"]])
        p["atl_a"][s] = (0.4, 0.7, 0.8, 0.9)[f["sev"]]


def _draw_effusion(rng, p: dict, f: dict) -> None:
    """Only where a costophrenic angle is left free by the heart."""
    free = [s for s in (0, 1) if _in_lung(p, s, _SIGN[s] * (p["lc"][s] + 0.7 * p["rx"][s]),
                                          p["dt"][s] + 0.5 * p["dk"] - p["atl_e"][s] - 0.05, 0.02)]
    sides = [s for s in _one_side(rng, 1.0 if f["sev"] == 0 else 0.6) if s in free] or free[-1:]
    f.update(sides=sides, sevs={s: 1 + int(3 * rng.random()) for s in sides}, drawn=bool(sides))
    f["sevs"].update({s: f["sev"] for s in sides[:1]})
    for s, g in f["sevs"].items():  # fluid height above the dome top, elevation included
        h = rng.uniform(*[(-0.1, -0.06), (-0.04, 0.04), (0.1, 0.18), (0.22, 0.3)][g])
        p["eff_h"][s] = h + p["atl_e"][s]
        p["eff_a"][s] = 0.45 if g == 0 else 0.9


def _draw_pneumothorax(rng, p: dict, f: dict) -> None:
    f["sides"] = _one_side(rng, 1.0 if f["sev"] == 0 else 0.9)
    for s in f["sides"]:
        p["ptx_d"][s] = rng.uniform(*[(0.06, 0.08), (0.1, 0.14), (0.15, 0.2),
                                      (0.22, 0.28)][f["sev"]])


# Lobar and plate findings need room in the lung the others left (rarely there is none).
def _draw_consolidation(rng, p: dict, f: dict) -> None:
    s = int(rng.random() < 0.45)
    lobe = ("upper", "lower", "middle")[int(rng.random() * (3 - s))]  # no left middle lobe
    box, r = _lobe_box(p, s, lobe), (0.7, 0.8, 1.0, 1.2)[f["sev"]]
    at = _place(rng, p, s, 0.07, box)
    p.update(con_a=(0.35, 0.6, 0.75, 0.9)[f["sev"]] if at else 0.0, con_s=float(s),
             con_box=list(box), con_c=[*(at or (5.0, 5.0)), r * rng.uniform(0.12, 0.2),
                                       r * rng.uniform(0.1, 0.17)])
    f.update(lobe=f"{_SIDES[s]} {lobe} lobe", bronch=f["sev"] >= 2 and rng.random() < 0.5,
             drawn=at is not None)


def _draw_lesion(rng, p: dict, f: dict) -> None:
    s = int(2 * rng.random())
    r = rng.uniform(*[(0.045, 0.052), (0.056, 0.07), (0.07, 0.085), (0.085, 0.11)][f["sev"]])
    at = _place(rng, p, s, r)
    p.update(les_a=(0.4 if f["sev"] == 0 else 0.75) if at else 0.0, les_s=float(s),
             les_c=[*(at or (5.0, 5.0)), r, rng.uniform(0, 2 * math.pi)])
    f.update(lobe=f"{_SIDES[s]} {_lobe_of(p, s, *(at or (0, 0)))} lobe",
             mm=2 * r * MM_PER_UNIT, drawn=at is not None)


def _draw_plates(rng, p: dict, f: dict) -> None:
    """Atelectasis, second part: plates go last, below whatever else is in the lung base."""
    for s in list(f["sides"]):
        top = p["dt"][s] - p["atl_e"][s]
        at = _place(rng, p, s, 0.05, (-9, 9, top - 0.31, top - 0.05))
        p["atl_g"][s] = [*(at or (5.0, 5.0)), rng.uniform(0.12, 0.2),
                         rng.uniform(0.038, 0.048), rng.uniform(-0.2, 0.2)]
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
    """Draws patient ``index`` of benchmark ``seed``: {"p": {name: float, list or array},
    "labels": int8 [C], "report": str, "id": str, "findings": {class: what the report states},
    "noise_seed": int}."""
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


# ============================================================================= the renderer
# `render` draws the stacked cases' parameters in cache-sized chunks, a chunk as one density map;
# for speed, each structure is computed only inside an image window that holds it for every pose,
# each finding only on the films that have it.
# ----------------------------------------------------------------------------- primitives
def _sd(u, v, cx, cy, rx, ry, lung=False):
    """Approximate signed distance (f / |grad f|, negative inside) to an ellipse or, for
    ``lung``, to the outline |du|^2 + |dv|^3 = 1, whose apex and base are broader."""
    du, dv = (u - cx) / rx, (v - cy) / ry
    fv, gv = (dv * dv * np.abs(dv), 3 * dv * dv) if lung else (dv * dv, 2 * dv)
    return (du * du + fv - 1) / (np.sqrt((2 * du / rx) ** 2 + (gv / ry) ** 2) + 1e-3)


def _field(F, a, b):
    """Smooth interpolation of per-image grids F [n, g, g] at a, b in [0, 1] ([n, H, W])."""
    n, g = F.shape[:2]
    fa, fb = np.clip(a, 0, 1) * (g - 1.001), np.clip(b, 0, 1) * (g - 1.001)
    fa0, fb0 = np.floor(fa), np.floor(fb)
    wa, wb = fa - fa0, fb - fb0
    wa, wb = wa * wa * (3 - 2 * wa), wb * wb * (3 - 2 * wb)  # smoothstep: no grid creases
    rows = np.arange(0, n * g * g, g * g, dtype=np.float32)[:, None, None]
    idx, flat = (fb0 * g + fa0 + rows).astype(np.intp), F.reshape(-1)
    c00, c01, c10, c11 = (flat[o:].take(idx) for o in (0, 1, g, g + 1))  # shifted views
    return (c00 + (c01 - c00) * wa) * (1 - wb) + (c10 + (c11 - c10) * wa) * wb


def _mix(x):
    """murmur3's 32-bit finaliser: a fast, well-mixed hash of uint32 arrays."""
    x = (x ^ (x >> 16)) * np.uint32(0x85EBCA6B)
    x = (x ^ (x >> 13)) * np.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _noise(seeds: list, size: int):
    """Zero-mean, unit-variance pixel noise [n, H, W], a pure function of (seed, pixel): hashed
    pixel indices (cheaper than a Generator per image), two 16-bit uniforms summed (triangular
    noise, close enough to Gaussian for acquisition noise)."""
    key = _mix(np.asarray(seeds, np.uint32))[:, None, None]
    pixel = np.arange(size * size, dtype=np.uint32).reshape(1, size, size)
    x = _mix(pixel * np.uint32(0x9E3779B1) + key)
    total = (x & 0xFFFF).astype(np.float32) + (x >> 16).astype(np.float32)
    return (total - 65535.0) * np.float32(math.sqrt(6.0) / 65536.0)


class _Films:
    """A chunk of n films being drawn: each pixel's patient coordinates u, v [n, H, W] and the
    masks M and sites S [n, C, H, W] the drawing functions below fill in."""

    def __init__(self, P: dict, size: int):
        n, C = len(P["rot"]), len(CLASS_NAMES)
        self.P = P
        self.g = g = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
        e = self.e
        X, Y, rot, sc = g[None, None, :] - e("tx"), g[None, :, None] - e("ty"), e("rot"), e("scale")
        u, v = (np.cos(rot) * X + np.sin(rot) * Y) / sc, (np.cos(rot) * Y - np.sin(rot) * X) / sc
        self.u, self.v, self.au, self.px = u, v, np.abs(u), 2.0 / (size * sc)  # px: 1 pixel
        self.lw = np.maximum(0.025, 0.8 * self.px)  # thin lines stay >= ~1 px wide at any size
        self.M, self.S = np.zeros((2, n, C, size, size), bool)

    def e(self, k: str, *j) -> np.ndarray:
        """Parameter k of every film, indexed by j within a film, as [n, 1, 1]."""
        return self.P[k][(slice(None), *j)][:, None, None]

    def rows(self, k: str, *j) -> np.ndarray:
        """The films whose parameter k (at j) is positive: those that have the finding."""
        return np.flatnonzero(self.P[k][(slice(None), *j)] > 0)

    def soft(self, sd, p=None):
        """Anti-aliased inside of a signed distance sd; p: the pixel size (default px)."""
        return np.clip(0.5 - sd / (self.px if p is None else p), 0.0, 1.0)

    def win(self, x0, x1, y0, y1) -> tuple:
        """(rows, cols) slices of the image window x0 < x < x1, y0 < y < y1."""
        g = self.g
        return slice(*np.searchsorted(g, (y0, y1))), slice(*np.searchsorted(g, (x0, x1)))


# ----------------------------------------------------------------------------- anatomy
def _soft_tissue(film: _Films) -> np.ndarray:
    """Density [n, H, W] of a barrel-shaped trunk, thicker centrally, shoulders rounding up to
    the neck."""
    e, u, v, au = film.e, film.u, film.v, film.au
    half = e("bw") * (1 - 0.05 * (v - 0.1) ** 2)
    top = -0.95 + 0.25 * np.clip((au - 0.2) / (e("bw") - 0.2), 0, 1) ** 2
    return film.soft(np.minimum(np.maximum(au - half, top - v), au - 0.21)) * (
        0.08 + 0.5 * np.clip(1 - (u / half) ** 2, 0, 1))


def _hearts(film: _Films, shape: tuple) -> tuple:
    """Signed distances [n, H, W] to the normal heart (hn), this film's heart (hc) and the
    mediastinum (med), 9 ("far away") outside their windows, and hm: inside the largest heart a
    site allows."""
    e, u, v = film.e, film.u, film.v
    hn, hc, med = np.full((3,) + shape, 9.0, np.float32)
    hm = np.zeros(shape, bool)
    R, Q = film.win(-0.45, 2, -0.25, 2)  # hearts up to ctr 0.68 stay in x > -0.33, y > -0.14
    hp = {k: e(k) for k in ("hax", "hay", "hcos", "hsin", "hrx", "hry")}
    fu, fv = _heart_frame(hp, u[:, R, Q], v[:, R, Q])
    hn[:, R, Q] = hc[:, R, Q] = _sd(fu, fv, *_heart(hp, 1.0))
    cx, _, rx, ry = _heart(hp, _CTR_MAX / e("ctr"))
    hm[:, R, Q] = ((fu - cx) / rx) ** 2 + (fv / ry) ** 2 < 1
    i = np.flatnonzero(film.P["card_k"] > 1)
    hc[i, R, Q] = _sd(fu[i], fv[i], *_heart({k: a[i] for k, a in hp.items()}, e("card_k")[i]))
    R, Q = film.win(-0.4, 0.45, -2, 2)  # mediastinum and aortic knob: -0.28 < x < 0.36
    u_, v_ = u[:, R, Q], v[:, R, Q]
    mw = e("mw") + 0.03 * (v_ + 0.8)  # widening downwards; the aortic knob bulges to the left
    knob = np.sqrt((u_ - e("mcx") - e("mw") - 0.03) ** 2 + (v_ + 0.33) ** 2) - 0.065
    med[:, R, Q] = np.minimum(np.maximum(np.abs(u_ - e("mcx")) - mw, v_ - e("hcy")), knob)
    return hn, hc, hm, med


def _lung(film: _Films, s: int, d, hn, hc, med) -> SimpleNamespace:
    """Side s's lung: removes its air from the density d (in place) and returns its geometry,
    within its window R, Q (the right lung lies in x < 0.02, the left in x > -0.02, for every
    pose: half the columns)."""
    e, px, sg = film.e, film.px, _SIGN[s]
    R, Q = film.win(-2, 0.1, -2, 2) if s == 0 else film.win(-0.1, 2, -2, 2)
    u_, v_, d_, hn_, hc_, med_ = (a[:, R, Q] for a in (film.u, film.v, d, hn, hc, med))  # views
    cx, rx, dt = sg * e("lc", s), e("rx", s), e("dt", s)
    ell = _sd(u_, v_, cx, e("cy"), rx, e("ry"), lung=True)
    lat = sg * (u_ - cx)
    # Hemidiaphragm dome: steep laterally (the costophrenic angle), shallow medially, where
    # it meets the heart (the cardiophrenic angle).
    dome = dt + e("dk") * (lat / rx) ** 2 * np.where(lat > 0, 1.0, 0.35)
    # norm: healthy lung, cur: this film's lung; hard regions include the anti-aliased rim.
    norm = np.maximum(np.maximum(ell, v_ - dome), -np.minimum(hn_, med_)) < px / 2
    cur = np.maximum(np.maximum(ell, v_ - dome + e("atl_e", s)), -np.minimum(hc_, med_))
    lung, cur = film.soft(cur), cur < px / 2
    lt = lung * (0.45 + 0.55 * np.sqrt(np.clip(-ell / 0.2, 0, 1)))  # thin at the chest wall
    d_ -= _AIR * lt
    return SimpleNamespace(s=s, sg=sg, R=R, Q=Q, u=u_, v=v_, rx=rx, dt=dt, ell=ell, lat=lat,
                           dome=dome, norm=norm, cur=cur, lung=lung, lt=lt)


def _markings(film: _Films, L: SimpleNamespace, d, clear) -> None:
    """Lung markings: vessels fanning out of the hilum (zero lines of random polar waves),
    hidden where pleural air or fluid displaced the lung (``clear``)."""
    e, R, Q = film.e, L.R, L.Q
    hy = e("cy") - 0.08
    r = np.sqrt((L.u - L.sg * 0.2) ** 2 + (L.v - hy) ** 2) + 1e-3
    w, sin_th = (lambda j, k: e("ves", L.s, j, k)), (L.v - hy) / r  # noqa: E731
    f = 0.5 * sum(np.cos(w(0, k) * sin_th + w(1, k) * r + w(2, k)) for k in range(4))
    vessels = np.clip(1 - 1.6 * np.abs(f), 0, 1) / (1 + (r / 0.45) ** 2) + 0.5 * np.clip(
        1 - r / 0.16, 0, 1)
    d[:, R, Q] += 0.1 * vessels * L.lt * clear[:, R, Q]


def _bones_and_air(film: _Films, d, lung_all) -> None:
    """Posterior ribs arcing down laterally, fainter anterior ribs, clavicles, the trachea, the
    spine and the gastric bubble, added to the density d in place."""
    e, u, v, au, soft, win = film.e, film.u, film.v, film.au, film.soft, film.win
    outer, sp = (e("lc", 0) + e("rx", 0) + e("lc", 1) + e("rx", 1)) / 2 + 0.06, e("rib_sp")
    ph = (v + 0.15 * au - 0.8 * au ** 2 - e("rib_v0")) / sp
    rib = soft(np.abs(ph - np.floor(ph) - 0.5) * sp - e("rib_t") * (0.8 + 0.5 * au))
    pha = (v + 0.35 * au - e("rib_v0") - 0.3) / sp
    rib_a = soft(np.abs(pha - np.floor(pha) - 0.5) * sp - 0.8 * e("rib_t")) * (au > 0.25)
    cage = soft(np.maximum(np.maximum(0.07 - au, au - outer), sp * np.maximum(-ph, ph - 11.5)))
    d += (0.075 * rib + 0.035 * rib_a) * cage * (0.3 + 0.7 * lung_all)  # plain over air only
    R, Q = win(-2, 2, -2, -0.2)  # clavicles (above y = -0.57) and trachea (above y = -0.3)
    x0, y0, dx, dy, a_, v_ = 0.06, -0.76, 0.56, -0.14, au[:, R, Q], v[:, R, Q]
    t = np.clip(((a_ - x0) * dx + (v_ - y0) * dy) / (dx * dx + dy * dy), 0, 1)
    bow = 0.12 * t * (1 - t)  # the clavicle's upward bow
    d[:, R, Q] += 0.09 * soft(np.sqrt((a_ - x0 - t * dx) ** 2 + (v_ - y0 - t * dy + bow) ** 2)
                              - 0.04)
    trachea = soft(np.abs(u[:, R, Q] - e("mcx")) - 0.04) * np.clip((-0.3 - v_) / 0.08, 0, 1)
    d[:, R, Q] -= 0.1 * trachea
    R, Q = win(-0.25, 0.25, -2, 2)  # the spine (|x| < 0.21 for every pose), vertebrae faint
    vertebrae = 0.035 + 0.015 * np.cos(v[:, R, Q] * (2 * np.pi / 0.13))
    d[:, R, Q] += soft(au[:, R, Q] - 0.075) * vertebrae
    R, Q = win(0.0, 2, 0.2, 2)  # gastric bubble (x > 0.1, y > 0.33 for every pose)
    bub = ((u[:, R, Q] - 0.8 * e("lc", 1)) / 0.09) ** 2 + ((v[:, R, Q] - e("dt", 1) - 0.13)
                                                         / 0.05) ** 2
    d[:, R, Q] -= 0.1 * e("bubble") * soft(0.03 * (bub - 1))


# ----------------------------------------------------------------------------- pleural findings
# Each draws its finding in lung L's window, on the films that have it, into the density d, the
# masks and (on every film) the site.
def _pneumothorax(film: _Films, L: SimpleNamespace, d, clear) -> None:
    """Pleural air along the apex and lateral wall, a visceral pleural line."""
    e, px, lw, s, R, Q = film.e, film.px, film.lw, L.s, L.R, L.Q
    taper = np.clip((e("cy") + 0.1 - L.v) / 0.3, 0, 1) * np.clip(
        (L.lat + 0.6 * L.rx) / (0.3 * L.rx), 0, 1)
    film.S[:, 3, R, Q] |= L.norm & (L.ell > -_PTX_MAX * taper - lw) & (taper > 0)
    i = film.rows("ptx_d", s)
    if i.size:
        el, lu, depth = L.ell[i], L.lung[i], e("ptx_d", s)[i] * taper[i]
        ptx = np.minimum(film.soft(-el - depth, px[i]), lu) * (depth > 0)
        line = film.soft(np.abs(el + depth) - lw[i] / 2, px[i]) * lu * np.clip(4 * taper[i], 0, 1)
        d[i, R, Q] += 0.15 * line - 0.1 * ptx
        clear[i, R, Q] *= 1 - ptx
        film.M[i, 3, R, Q] |= L.cur[i] & (el > -depth - lw[i]) & (depth > 0)


def _effusion(film: _Films, L: SimpleNamespace, d, clear) -> None:
    """Dependent fluid up to a meniscus climbing the lateral chest wall."""
    e, px, s, R, Q, dt = film.e, film.px, L.s, L.R, L.Q, L.dt
    lat2 = _MENISCUS * np.clip(L.lat / L.rx, 0, 1) ** 2
    film.S[:, 2, R, Q] |= L.norm & (L.v > dt - _EFF_MAX - lat2)
    i = film.rows("eff_a", s)
    if i.size:
        level, vi = dt[i] - e("eff_h", s)[i] - lat2[i], L.v[i]
        fluid = film.soft(level - vi, px[i])
        dense = 0.8 + 0.2 * np.clip((vi - level) / 0.15, 0, 1)  # thicker fluid lower down
        d[i, R, Q] += _AIR * e("eff_a", s)[i] * fluid * L.lt[i] * dense
        clear[i, R, Q] *= 1 - fluid
        film.M[i, 2, R, Q] |= L.cur[i] & (vi > level - px[i] / 2)


def _atelectasis(film: _Films, L: SimpleNamespace, d) -> None:
    """A lens-shaped basal plate; volume loss raised the hemidiaphragm (L.cur)."""
    e, px, s, R, Q = film.e, film.px, L.s, L.R, L.Q
    film.S[:, 5, R, Q] |= L.norm & (L.v > L.dt - _BASE)
    i = film.rows("atl_a", s)
    if i.size:
        gu, gv, half_len, t, ang = (e("atl_g", s, j)[i] for j in range(5))
        du, dv = L.u[i] - gu, L.v[i] - gv
        al = du * np.cos(ang) + dv * np.sin(ang)
        ac = np.abs(dv * np.cos(ang) - du * np.sin(ang))
        plate = np.maximum(ac - t * np.sqrt(np.clip(1 - (al / half_len) ** 2, 0, 1)),
                           np.abs(al) - half_len)
        d[i, R, Q] += _AIR * e("atl_a", s)[i] * film.soft(plate, px[i]) * L.lt[i]
        lost = L.norm[i] & (L.v[i] - L.dome[i] + e("atl_e", s)[i] > -px[i] / 2)
        film.M[i, 5, R, Q] |= (L.cur[i] & (plate < px[i] / 2)) | lost


# ----------------------------------------------------------------------------- lung-field findings
def _side(film: _Films, a, k: str, i) -> np.ndarray:
    """a[side][i], side (0 right, 1 left) from parameter k: the lung of a film's finding."""
    return np.where(film.e(k)[i] > 0.5, a[1][i], a[0][i])


def _consolidation(film: _Films, d, lung_s, lung_h) -> None:
    """Patchy opacity, ill-defined but stopped by the lobe's fissures, with air bronchograms
    (dark rays from the hilum)."""
    e, lw, soft = film.e, film.lw, film.soft
    i = film.rows("con_a")
    if not i.size:
        return
    ui, vi, pxi = film.u[i], film.v[i], film.px[i]
    cu, cv, crx, cry = (e("con_c", j)[i] for j in range(4))
    blob, b = _sd(ui, vi, cu, cv, crx, cry), [e("con_box", j)[i] for j in range(4)]
    zone = np.maximum(np.maximum(b[0] - ui, ui - b[1]), np.maximum(b[2] - vi, vi - b[3]))
    bx, by = (2 * e("con_s")[i] - 1) * 0.2, e("cy")[i] - 0.08
    th, bronch = np.arctan2(cv - by, cu - bx), 0.0
    for dth in (-0.3, 0.25):
        dx, dy = np.cos(th + dth), np.sin(th + dth)
        ray = soft(np.abs((ui - bx) * dy - (vi - by) * dx) - 0.6 * lw[i], pxi)
        bronch = np.maximum(bronch, ray * ((ui - bx) * dx + (vi - by) * dy > 0.1))
    patchy = 0.35 + 0.65 * _field(film.P["patch"][i], 0.5 + (ui - cu) / (2.4 * crx),
                                  0.5 + (vi - cv) / (2.4 * cry))
    opac = np.clip(-blob / 0.06, 0, 1) * soft(zone, pxi) * _side(film, lung_s, "con_s", i)
    d[i] += _AIR * e("con_a")[i] * opac * patchy * (1 - 0.55 * bronch)
    film.M[i, 4] = _side(film, lung_h, "con_s", i) & (blob < 0) & (zone < pxi / 2)


def _lesion(film: _Films, d, lung_s, lung_h) -> None:
    """A slightly lobulated round opacity, denser centrally."""
    e, px = film.e, film.px
    i = film.rows("les_a")
    if not i.size:
        return
    lu, lv, lr, lph = (e("les_c", j)[i] for j in range(4))
    dx, dy = film.u[i] - lu, film.v[i] - lv
    rr = np.sqrt(dx * dx + dy * dy) + 1e-6
    sin3, cos3 = (3 - 4 * (dy / rr) ** 2) * dy / rr, (4 * (dx / rr) ** 2 - 3) * dx / rr
    sd = rr - lr * (1 + 0.08 * (sin3 * np.cos(lph) + cos3 * np.sin(lph)))  # sin(3 phi + lph)
    core = 0.85 + 0.15 * np.clip(-sd / lr, 0, 1)
    d[i] += _AIR * e("les_a")[i] * film.soft(sd, px[i]) * _side(film, lung_s, "les_s", i) * core
    film.M[i, 6] = _side(film, lung_h, "les_s", i) & (sd < px[i] / 2)


# ----------------------------------------------------------------------------- films
def _render(P: dict, seeds: list, size: int):
    """Pixels [n, H, W], masks and sites [n, C, H, W] of stacked case parameters P."""
    film = _Films(P, size)
    e, px, M, S = film.e, film.px, film.M, film.S
    d = _soft_tissue(film)
    hn, hc, hm, med = _hearts(film, d.shape)
    lung_s = np.zeros((2,) + d.shape, np.float32)
    lung_h, lung_n = np.zeros((2, 2) + d.shape, bool)
    clear = np.ones_like(d)  # 0 where pleural air or fluid displaces the lung markings
    for s in (0, 1):
        L = _lung(film, s, d, hn, hc, med)
        _pneumothorax(film, L, d, clear)
        _effusion(film, L, d, clear)
        _atelectasis(film, L, d)
        _markings(film, L, d, clear)
        lung_s[s][:, L.R, L.Q], lung_h[s][:, L.R, L.Q], lung_n[s][:, L.R, L.Q] = L.lt, L.cur, L.norm
    lung_all, norm_any = lung_s[0] + lung_s[1], lung_n[0] | lung_n[1]
    M[:, 1] = (hc < px / 2) & (hn > -px / 2) & norm_any & (e("card_k") > 1)
    S[:, 1] = hm & (hn > -px / 2) & norm_any
    S[:, 4] = S[:, 6] = norm_any
    _consolidation(film, d, lung_s, lung_h)
    _lesion(film, d, lung_s, lung_h)
    _bones_and_air(film, d, lung_all)
    image = np.clip(e("bright") + e("contrast") * d, 0, 1) ** e("gamma")
    image = np.clip(image + _noise(seeds, size) * e("noise_sd"), 0, 1).astype(np.float32)
    return image, M & S, S  # the intersection only trims sub-pixel rounding at region edges


def render(cases: list[dict], image_size: int, drop: tuple[str, ...] = (), *,
           progress: bool = False) -> dict:
    """Draws `sample_case` outputs; ``drop`` leaves findings out (same patient, same noise).

    Returns {"image": float32 [N, H, W, 1] in [0, 1], "masks", "sites": bool [N, C, H, W]}.
    """
    unknown = [c for c in drop if c not in _ABSENT]
    if unknown:
        raise ValueError(f"cannot drop {unknown}: expected names from {LOCALIZED_CLASSES}")
    C, H = len(CLASS_NAMES), image_size
    if not cases:
        return dict(image=np.zeros((0, H, H, 1), np.float32), masks=np.zeros((0, C, H, H), bool),
                    sites=np.zeros((0, C, H, H), bool))
    P = {k: np.stack([np.asarray(c["p"][k], np.float32) for c in cases]) for k in cases[0]["p"]}
    for name in drop:
        P.update({k: np.full_like(P[k], val) for k, val in _ABSENT[name].items()})
    seeds, step = [c["noise_seed"] for c in cases], max(1, 2 ** 17 // H ** 2)  # cache-sized chunks
    chunks = tqdm.tqdm(range(0, len(cases), step), desc=f"synthetic {H} px", unit="chunk",
                       disable=not progress)
    parts = [_render({k: a[i:i + step] for k, a in P.items()}, seeds[i:i + step], H)
             for i in chunks]
    image, masks, sites = (np.concatenate(x) for x in zip(*parts))
    return dict(image=image[..., None], masks=masks, sites=sites)


# ============================================================================= the benchmark
def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def generate(num: int, *, image_size: int = 64, seed: int = 0, start: int = 0,
             progress: bool = False) -> dict:
    """Records ``start .. start + num - 1`` of the benchmark ``seed`` (``progress``: a tqdm bar).

    Returns {"image": float32 [N, H, W, 1] in [0, 1], "labels": int8 [N, C] in {-1, 0, 1},
    "masks": bool [N, C, H, W], "sites": bool [N, C, H, W], "report": str [N], "id": str [N]}
    with C = len(CLASS_NAMES), H = W = image_size.
    """
    num, image_size = _check_int("num", num, 0), _check_int("image_size", image_size, 32)
    seed, start = _check_int("seed", seed, 0), _check_int("start", start, 0)
    cases = [sample_case(seed, start + i) for i in range(num)]
    out, C = render(cases, image_size, progress=progress), len(CLASS_NAMES)
    out["labels"] = np.array([c["labels"] for c in cases], np.int8).reshape(num, C)
    out["report"] = np.array([c["report"] for c in cases], dtype=str).reshape(num)
    out["id"] = np.array([c["id"] for c in cases], dtype=str).reshape(num)
    chex.assert_shape(out["image"], (num, image_size, image_size, 1))
    chex.assert_shape([out["masks"], out["sites"]], (num, C, image_size, image_size))
    return out
