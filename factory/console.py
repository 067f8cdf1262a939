"""The console of ``factory run``: one progress bar per stage, a closing summary table, and a log file.

Quiet by default: the console shows the stages' bars (count, images/s, ETA) and, at the end, one table
(per recipe: images, key metrics, downstream accuracy; wall time per stage; where the report and the log
are). Everything logged on the driver (factory's own lines, Ray's and Ray Data's loggers) goes to
``<output>/factory.log``; what Ray's processes print (actors, Ray Train's controller and workers) stays in
Ray's own session logs (``/tmp/ray/session_latest/logs``), where Ray puts them. ``--verbose`` brings that
output back to the console (``log_to_driver``), with Ray's C++ warnings and the driver's INFO lines.

The knobs: ``ray.init(log_to_driver=...)``; the "ray" logger propagating to the root logger, whose handler
is the log file (``ray.init(configure_logging=False)`` leaves it without a handler, so its warnings
fell to Python's last-resort handler on stderr); Ray Data's ``ray.data`` console handler at ERROR; and
this process's file descriptor 2, where Ray's C++ core worker prints (the "constructor arguments in the
object store" error of Ray Data's and Ray Train's restartable actors), sent to the log (:class:`NativeStderr`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile

LOG = logging.getLogger("factory")
LOG_FILE = "factory.log"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_verbose = False


def verbose() -> bool:
    """Whether this process shows Ray's own output on the console (``factory run --verbose``)."""
    return _verbose


def set_verbose(on: bool) -> None:
    """Choose the console, before Ray starts."""
    global _verbose
    _verbose = bool(on)


class OutputLog(logging.Handler):
    """``<output>/factory.log``, appended to: records wait in memory until the run has made its output
    folder (a run that fails its checks leaves nothing behind), then go straight to the file. An output on
    object storage gets the whole log at the end (:func:`stop_log`)."""

    def __init__(self, output: str):
        super().__init__(logging.INFO)
        import fsspec

        self.fs, root = fsspec.core.url_to_fs(output)
        self.local = type(self.fs).__name__ == "LocalFileSystem"
        self.path = os.path.join(os.path.abspath(root), LOG_FILE) if self.local else f"{output.rstrip('/')}/{LOG_FILE}"
        self.buffer: list[str] = []
        self.file = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            if self.file is None and self.local and os.path.isdir(os.path.dirname(self.path)):
                self.file = open(self.path, "a", encoding="utf-8")
                self.file.writelines(self.buffer)
                self.buffer = []
            if self.file is not None:
                self.file.write(line)
                self.file.flush()
            else:
                self.buffer.append(line)
        except Exception:
            self.handleError(record)

    def finish(self) -> str | None:
        """Close the file (or write the buffered log to object storage); the log's path, None if unwritten."""
        if self.file is not None:
            self.file.close()
            return self.path
        if self.buffer and not self.local:
            try:
                if self.fs.exists(f"{os.path.dirname(self.path)}/run.json"):  # the run got past its checks
                    old = self.fs.cat_file(self.path).decode() if self.fs.exists(self.path) else ""
                    self.fs.pipe_file(self.path, (old + "".join(self.buffer)).encode())
                    return self.path
            except Exception:  # the log must never fail the run
                return None
        return None


class NativeStderr:
    """Quiet mode: file descriptor 2 (where Ray's C++ core worker in this process prints, e.g. "Actor ... has
    constructor arguments in the object store and max_restarts > 0" for Ray Data's and Ray Train's
    restartable actors, at any time) goes to a temporary file that ends in the log, while Python's
    ``sys.stderr`` (the bars, factory's errors) keeps writing to the terminal through a copy of it."""

    def __init__(self):
        self.saved = self.tmp = self.stderr = None

    def start(self) -> None:
        try:
            if sys.stderr.fileno() != 2:
                return
        except (AttributeError, OSError, ValueError):  # stderr replaced (pytest's capture): leave it
            return
        sys.stderr.flush()
        self.saved = os.dup(2)
        self.tmp = tempfile.TemporaryFile()
        self.stderr = sys.stderr
        sys.stderr = open(os.dup(self.saved), "w", buffering=1, encoding=self.stderr.encoding,
                          errors=self.stderr.errors)
        os.dup2(self.tmp.fileno(), 2)

    def stop(self) -> str:
        """Restore fd 2; returns what went to it."""
        if self.saved is None:
            return ""
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        sys.stderr.close()
        sys.stderr = self.stderr
        self.tmp.seek(0)
        text = self.tmp.read().decode(errors="replace").strip()
        self.tmp.close()
        self.saved = None
        return text


_native: NativeStderr | None = None


@contextlib.contextmanager
def ray_startup():
    """Around ``ray.init``: in quiet mode what Ray's C++ core prints straight to stderr while it starts (the
    "Set ray log level" line) goes to the log instead. Verbose, or fd 2 already taken: nothing changes."""
    if _verbose or (_native is not None and _native.saved is not None):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace").strip()
            if text:
                LOG.info("ray.init printed:\n%s", text)


def start_log(output: str) -> OutputLog:
    """Send every record of the driver's loggers (INFO and up) to ``<output>/factory.log``; returns the
    handler for :func:`stop_log`.

    With a handler on the root logger, Python no longer prints unhandled warnings of Ray's loggers to
    stderr (its last-resort handler); in verbose mode a console handler shows them too.
    """
    global _native
    handler = OutputLog(output)
    if not _verbose:
        _native = NativeStderr()
        _native.start()
    handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    if _verbose:
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.INFO)
        console.setFormatter(logging.Formatter(_FORMAT))
        console.set_name("factory-console")
        root.addHandler(console)
    _ray_data_logger(handler)
    return handler


def stop_log(handler: OutputLog) -> str | None:
    """Detach the log; returns where it was written (None: the run stopped before making its output)."""
    global _native
    if _native is not None:
        text = _native.stop()
        _native = None
        if text:
            LOG.info("printed by native code (Ray's core worker) on stderr:\n%s", text)
    root = logging.getLogger()
    for h in list(root.handlers):
        if h is handler or h.get_name() == "factory-console":
            root.removeHandler(h)
    logging.getLogger("ray.data").removeHandler(handler)
    where = handler.finish()
    handler.close()
    return where


def _ray_data_logger(handler: logging.Handler | None = None) -> None:
    """Ray's and Ray Data's loggers do not propagate and have their own console handlers: in quiet mode
    those show errors only (no "Token authentication is enabled", no "Progress bars disabled"), and the
    records go to our log file as well."""
    try:
        import ray.data  # noqa: F401  (configures the "ray" and "ray.data" loggers on import)
    except ImportError:
        return
    # ray.init(configure_logging=False) clears the "ray" logger's handlers, and its records, which do not
    # propagate, would fall to Python's last-resort handler (stderr): they go up to the root logger instead
    ray_logger = logging.getLogger("ray")
    ray_logger.handlers.clear()
    ray_logger.propagate = True
    logger = logging.getLogger("ray.data")
    for h in logger.handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, (logging.FileHandler, OutputLog)):
            h.setLevel(logging.INFO if _verbose else logging.ERROR)
    if handler is not None and handler not in logger.handlers:
        logger.addHandler(handler)


def quiet_ray_data() -> None:
    """Apply the console choice to Ray Data's logger (called once Ray is up)."""
    _ray_data_logger()


def bar(total: int, desc: str, unit: str = "img", disable: bool = False, **kwargs):
    """A tqdm bar in the style of every stage: count / total, rate, elapsed < ETA."""
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{desc:<11}", unit=unit, unit_scale=False, disable=disable, dynamic_ncols=True,
                bar_format="{desc} {percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt} {unit} "
                           "[{elapsed}<{remaining}, {rate_fmt}]{postfix}", **kwargs)


# --- the closing summary ---------------------------------------------------------------------------


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _seconds(s: float | None) -> str:
    if s is None:
        return "–"
    s = round(float(s))  # whole seconds first: 179.6 s is 3 m 00 s, not 2 m 60 s
    return f"{s} s" if s < 90 else f"{s // 60} m {s % 60:02d} s"


def tuning_lines(tuning: dict | None) -> list[str]:
    """One line per tuned recipe: the value chosen, and every trial's objective on the validation carve."""
    out = []
    for recipe, t in (tuning or {}).items():
        trials = ", ".join(f"{row['value']}: {_fmt(row.get(t['objective']))}" for row in t["trials"])
        out.append(f"tuned {recipe}: {t['param']} = {t['chosen']} (written {t['written']}; {t['objective']} on a "
                   f"validation carve of train: {trials})")
    return out


def summary_table(output: str, metrics: dict, wall: dict, report: str | None = None, log: str | None = None,
                  tuning: dict | None = None) -> str:
    """The run's closing summary: a table of every set (the real train split first) and the wall times."""
    columns = [("images", "num_images", 0), ("precision", "precision", 3), ("recall", "recall", 3),
               ("coverage", "coverage", 3), ("labels", "label_agreement", 3), ("FD", "fd", 3),
               ("hardness", "hardness_mean", 1)]
    # downstream accuracy on the real test split, one column per training mode of the recipes' sets; the
    # real train split's classifier ("real" mode) in the first
    modes = sorted({m for row in metrics.values() for m in (row.get("downstream") or {})} - {"real"}) or \
        (["real"] if any("downstream" in row for row in metrics.values()) else [])
    head = ["set"] + [c[0] for c in columns] + [f"downstream acc. ({m})" if len(modes) > 1 else "downstream acc."
                                                 for m in modes]
    rows = []
    for name in sorted(metrics, key=lambda n: (n != "real", list(metrics).index(n))):
        m = metrics[name]
        cells = [name if name != "real" else "real (train)"]
        for _, key, digits in columns:
            v = m.get(key)
            cells.append(f"{v:,}" if key == "num_images" and v is not None else _fmt(v, digits))
        acc, std = dict(m.get("downstream") or {}), dict(m.get("downstream_std") or {})
        if "real" in acc and modes:
            acc.setdefault(modes[0], acc.pop("real"))
            if "real" in std:
                std.setdefault(modes[0], std.pop("real"))
        for mode in modes:  # the mean over downstream.seeds, ± their std
            cells.append(_fmt(acc.get(mode)) + (f" ± {std[mode]:.3f}" if mode in std else ""))
        rows.append(cells)
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    stages = [(k, wall.get(k)) for k in ("tune", "finetune", "sampling", "scoring", "downstream")
              if (wall.get(k) or 0) >= 0.5]
    out += [""] + tuning_lines(tuning) if tuning else []
    out.append("")
    out.append("wall: " + _seconds(wall.get("total")) + " (" + ", ".join(f"{k} {_seconds(v)}" for k, v in stages) + ")")
    out.append(f"output: {output}")
    if report:
        out.append(f"report: {report}")
    if log:
        out.append(f"log:    {log}")
    return "\n".join(out)
