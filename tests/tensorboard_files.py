"""Reading a run's TensorBoard event files back, with TensorBoard's own readers (tests)."""

from pathlib import Path


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of one TensorBoard run folder, as TensorBoard's reader sees it (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_images(logdir: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"images": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}


def raw_steps(logdir: Path, tag: str) -> list[int]:
    """The steps written for `tag`, file by file, without TensorBoard's purge (what a naive reader would plot)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for f in sorted(logdir.glob("events.out.tfevents.*")):
        for ev in EventFileLoader(str(f)).Load():
            steps += [ev.step for v in ev.summary.value if v.tag == tag]
    return steps
