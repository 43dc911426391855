"""Radiology report text for the synthetic benchmark.

A report names each drawn finding by its standard term or a standard synonym, with severity and
side, states some negatives with the usual negation cues and hedges uncertain findings ("cannot
exclude", "possible"), so that the CheXpert labeler's reading of the text gives the record's
labels.  Templates x synonyms x sentence order vary the phrasing so that retrieval is not a
string match.
"""

from __future__ import annotations

from typing import Sequence

_SIDES = ("right", "left")  # side 0: the patient's right
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
