"""Which part of a Label Studio labeling config our detections fill in, parsed with label-studio-sdk's own
``LabelInterface`` (the same parser Label Studio's ML backends use), never with a hand-written XML reader.

A detection can become a brush mask (``BrushLabels``), polygons (``PolygonLabels``) or a box
(``RectangleLabels``) on an ``Image``; the richest control the config has wins. A class of the model maps to a
label of that control by name, or through the label's ``predicted_values`` (Label Studio's convention for
mapping model outputs to differently named labels, e.g. ``<Label value="Person" predicted_values="person"/>``);
classes without a label are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from service.core.errors import BadRequest, InternalError, InvalidOption

Kind = Literal["brush", "polygon", "rectangle"]
# The controls we fill in, richest first, with the key of their labels in a result's value.
CONTROLS: dict[str, Kind] = {"BrushLabels": "brush", "PolygonLabels": "polygon", "RectangleLabels": "rectangle"}


@dataclass(frozen=True)
class Target:
    """Where detections go: the control (``from_name``) of ``kind`` on the image object ``to_name``, whose image
    URL is the task's ``data[data_key]``; ``labels`` maps a class name to its label."""

    kind: Kind
    from_name: str
    to_name: str
    data_key: str
    labels: dict[str, str]

    @property
    def result_type(self) -> str:
        """A result's ``type`` and the key of its labels in ``value`` (``brushlabels``, ...)."""
        return {"brush": "brushlabels", "polygon": "polygonlabels", "rectangle": "rectanglelabels"}[self.kind]


def target_of(label_config: str, class_names: list[str]) -> Target:
    """The control our detections fill in for this config: the richest one on an ``Image`` with a label for at
    least one of ``class_names`` (the model's, without the background). BadRequest for a config that does not
    parse, InvalidOption for one with nothing we can fill in, InternalError without label-studio-sdk (the
    serving image leaves the annotation extra out)."""
    try:
        from label_studio_sdk.label_interface import LabelInterface  # the annotation extra; imported on first use
    except ImportError:
        raise InternalError("label_studio_sdk_missing", "this server has no label-studio-sdk, which the Label Studio "
                            "backend needs: pip install 'maskrcnn-service[annotation]'") from None
    try:
        interface = LabelInterface(label_config)
    except Exception as exc:  # the SDK raises bare XML and its own errors alike
        raise BadRequest("bad_label_config", f"the labeling config does not parse ({exc})") from None
    candidates = [c for c in interface.controls if c.tag in CONTROLS]
    candidates.sort(key=lambda c: list(CONTROLS).index(c.tag))
    for control in candidates:
        images = [o for o in control.objects if o.tag == "Image"]
        labels = label_map(control.labels_attrs, class_names)
        if images and labels:
            return Target(CONTROLS[control.tag], control.name, images[0].name, images[0].value_name, labels)
    if not candidates:
        raise InvalidOption("unsupported_label_config", "the labeling config has no BrushLabels, PolygonLabels or "
                            "RectangleLabels on an Image")
    offered = sorted({label for control in candidates for label in control.labels})
    raise InvalidOption("no_matching_labels", f"none of the config's labels {offered} is a class of the model "
                        f"{class_names} (match by name, or with predicted_values=\"class\" on the Label)")


def label_map(labels: dict[str, object], class_names: list[str]) -> dict[str, str]:
    """Class name -> label value, for the classes that have one: a label of the same name, or one whose
    ``predicted_values`` (comma-separated) name the class."""
    mapping: dict[str, str] = {}
    for value, tag in labels.items():
        attrs: dict[str, str] = getattr(tag, "attr", {}) or {}
        names = [value, *(v.strip() for v in attrs.get("predicted_values", "").split(",") if v.strip())]
        for name in names:
            if name in class_names:
                mapping.setdefault(name, value)
    return mapping
