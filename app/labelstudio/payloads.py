"""What Label Studio sends an ML backend (only the fields warmtune reads), the labelling config,
and pre-annotations in Label Studio's format."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from xml.etree import ElementTree

from pydantic import BaseModel, ConfigDict, Field

from app.errors import InvalidLabelConfig, InvalidUpdate

SINGLE_CHOICE = ("single", "single-radio")


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Annotation(_Payload):
    id: int
    task: int | None = None
    result: list[dict[str, Any]] = []
    was_cancelled: bool = False
    updated_at: datetime | None = None


class Task(_Payload):
    id: int
    data: dict[str, Any]
    annotations: list[Annotation] = []


class Project(_Payload):
    id: int
    label_config: str


class ById(_Payload):
    id: int


class WebhookEvent(_Payload):
    action: str
    project: Project | None = None
    annotation: Annotation | list[Annotation] | None = None
    task: Task | list[Task] | None = None
    annotations: list[ById] = []
    tasks: list[ById] = []

    def annotated(self) -> list[tuple[Annotation, Task]]:
        """The annotations of an ANNOTATION(S)_CREATED or ANNOTATION_UPDATED event, each with its task."""
        annotations = self.annotation if isinstance(self.annotation, list) else [self.annotation] if self.annotation else []
        tasks = self.task if isinstance(self.task, list) else [self.task] if self.task else []
        by_id = {task.id: task for task in tasks}
        pairs = []
        for annotation in annotations:
            task = by_id.get(annotation.task) if annotation.task is not None else tasks[0] if len(tasks) == 1 else None
            if task is None:
                raise InvalidUpdate(f"annotation {annotation.id} comes without its task")
            pairs.append((annotation, task))
        return pairs


class PredictRequest(_Payload):
    tasks: list[Task]
    label_config: str


class SetupRequest(_Payload):
    project: str = ""
    label_config: str = Field(alias="schema")


@dataclass(frozen=True)
class LabelConfig:
    """The part of a project's labelling config warmtune uses: one image, classified by one choice."""

    image_name: str  # the <Image> tag's name (the to_name of results)
    image_key: str  # the task data field holding the image's URL
    choices_name: str  # the <Choices> tag's name (the from_name of results)
    classes: tuple[str, ...]  # what results say: each <Choice>'s alias, or its value


def parse_label_config(xml: str) -> LabelConfig:
    """The image and single-choice class of a labelling config; InvalidLabelConfig for anything else."""
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as exc:
        raise InvalidLabelConfig(f"the label config is not XML: {exc}") from None
    images = {tag.get("name"): tag.get("value", "") for tag in root.iter("Image")}
    found = [c for c in root.iter("Choices") if c.get("name") and images.get(c.get("toName", ""), "").startswith("$")]
    if not found:
        raise InvalidLabelConfig(
            'warmtune classifies images: the label config needs a <Choices name=...> whose toName is an <Image name=... value="$field"/>'
        )
    if len(found) > 1:
        names = ", ".join(repr(c.get("name")) for c in found)
        raise InvalidLabelConfig(f"the label config classifies images with {len(found)} <Choices> ({names}); warmtune learns one")
    [choices] = found
    if choices.get("choice", "single") not in SINGLE_CHOICE:
        raise InvalidLabelConfig(f"<Choices name={choices.get('name')!r}> allows several choices; warmtune takes one class per image")
    target = choices.get("toName", "")
    classes = tuple(c.get("alias") or c.get("value", "") for c in choices.iter("Choice") if c.get("alias") or c.get("value"))
    return LabelConfig(target, images[target][1:], choices.get("name", ""), classes)


def annotation_label(annotation: Annotation, config: LabelConfig) -> str | None:
    """The class an annotation gives its image; None when it gives none (skipped, or no choice made)."""
    if annotation.was_cancelled:
        return None
    chosen: list[Any] = []
    for item in annotation.result:
        if item.get("type") != "choices" or item.get("from_name") != config.choices_name:
            continue
        value = item.get("value")
        choices = value.get("choices") if isinstance(value, dict) else None
        if not isinstance(choices, list):
            raise InvalidUpdate(f"annotation {annotation.id}: a choices result needs value.choices, a list of strings")
        chosen += choices
    if len(chosen) > 1:
        raise InvalidUpdate(f"annotation {annotation.id} makes {len(chosen)} choices; warmtune takes one class per image")
    if chosen and not isinstance(chosen[0], str):
        raise InvalidUpdate(f"annotation {annotation.id}: a choice must be a string, got {chosen[0]!r}")
    return chosen[0] if chosen else None


def image_reference(task: Task, config: LabelConfig) -> str:
    ref = task.data.get(config.image_key)
    if not isinstance(ref, str) or not ref:
        raise InvalidUpdate(f"task {task.id} has no image URL in data.{config.image_key}")
    return ref


def pre_annotation(ranked: list[tuple[str, float]], config: LabelConfig, version: int) -> dict[str, Any]:
    """A prediction in Label Studio's format: the best-ranked label that is one of the project's
    choices (none if the served version knows none of them), with warmtune's version."""
    label, score = next(((label, score) for label, score in ranked if label in config.classes), (None, 0.0))
    result = [{"from_name": config.choices_name, "to_name": config.image_name, "type": "choices", "value": {"choices": [label]}}]
    return {"result": result if label is not None else [], "score": score, "model_version": str(version)}
