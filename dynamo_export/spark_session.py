"""Starting Spark for dynamo-cooccur --engine spark, and reporting what its job did.

Kept apart from the job (dynamo_export/cooccurrence_spark.py): finding Java 17+ and
pyspark with one-line errors naming the fix, turning --spark-conf entries into a
SparkConf, starting and stopping the SparkContext, and timing each phase of the job as
a job group whose stages are tabled at the end (the UI's REST API gives task time and
shuffle bytes where the UI runs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from dynamo_export.errors import CooccurrenceError
from runtime.launcher import install_command

if TYPE_CHECKING:
    from pyspark import SparkContext

DEFAULT_MASTER = "local[*]"
JAVA_MIN_VERSION = 17  # pyspark 4.x runs on Java 17 or 21


class SparkEngineError(CooccurrenceError):
    """The Spark engine cannot start, or its job failed."""


class SparkExtraMissing(SparkEngineError):
    """pyspark or fsspec, the `spark` extra, is not installed."""


class JavaNotFoundError(SparkEngineError):
    """No Java 17+ for pyspark's JVM."""


class SparkConfError(SparkEngineError):
    """A --spark-conf entry is malformed, or Spark refused the configuration."""


@contextmanager
def spark_context(
    master: str = DEFAULT_MASTER, spark_conf: Sequence[str] = (), progress: bool = True
) -> Iterator[SparkContext]:
    """A SparkContext named dynamo-cooccur on `master`, with `spark_conf` ("KEY=VALUE"); stopped on exit.

    The Python workers run spark.pyspark.python, else $PYSPARK_PYTHON, else (local mode) this
    interpreter, which has numpy and this package; on a cluster, ship an environment with them.
    """
    settings = parse_spark_conf(spark_conf)
    pyspark = pyspark_module()
    check_java()
    conf = pyspark.SparkConf().setMaster(master).setAppName("dynamo-cooccur")
    conf.set("spark.ui.showConsoleProgress", "true" if progress else "false")
    conf.setAll(list(settings.items()))
    python = settings.get("spark.pyspark.python", os.environ.get("PYSPARK_PYTHON"))
    if python is None and master.startswith("local"):
        python = sys.executable
    from py4j.protocol import Py4JError

    try:
        sc = pyspark.SparkContext(conf=conf)
    except (Py4JError, RuntimeError, ValueError) as exc:  # the JVM did not start, or refused the settings
        given = "".join(f" --spark-conf {k}={v}" for k, v in settings.items())
        raise SparkConfError(
            f"Spark did not start with --spark-master {master}{given}: {_first_line(exc)}"
        ) from exc
    if python is not None:  # pyspark itself only reads $PYSPARK_PYTHON, else runs "python3"
        sc.pythonExec = python
    try:
        yield sc
    finally:
        sc.stop()


def parse_spark_conf(entries: Sequence[str]) -> dict[str, str]:
    """--spark-conf KEY=VALUE entries as a dict; SparkConfError naming every malformed one."""
    settings, bad = {}, []
    for entry in entries:
        key, sep, value = entry.partition("=")
        key = key.strip()
        if not sep or not key.startswith("spark.") or key in ("spark.", "spark.master"):
            bad.append(entry)
        else:
            settings[key] = value
    if bad:
        raise SparkConfError(
            f"--spark-conf takes KEY=VALUE with a spark.* key (Hadoop options as spark.hadoop.*; the "
            f"master is --spark-master), got {', '.join(map(repr, bad))}"
        )
    return settings


def java_problem() -> str | None:
    """Why pyspark cannot start its JVM here, in one line; None when Java 17+ is found.

    Looks where pyspark's launcher (spark-class) looks: $JAVA_HOME/bin/java, else java on PATH.
    """
    fix = f"install Java {JAVA_MIN_VERSION}+ (apt-get install openjdk-17-jre-headless) or point JAVA_HOME at one"
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    where = f"JAVA_HOME={java_home}" if java_home else "PATH"
    if not java or not os.access(java, os.X_OK):
        return f"Spark (pyspark 4) needs Java {JAVA_MIN_VERSION}+ and found no java on {where}: {fix}"
    try:
        shown = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"Spark (pyspark 4) needs Java {JAVA_MIN_VERSION}+ and {java} -version failed ({exc}): {fix}"
    found = re.search(r'version "(\d+)(?:\.(\d+))?', shown.stderr + shown.stdout)
    if not found:
        return f"Spark (pyspark 4) needs Java {JAVA_MIN_VERSION}+ and {java} -version names no version: {fix}"
    major = int(found[2] or 0) if found[1] == "1" else int(found[1])  # "1.8.0_402" is Java 8
    if major < JAVA_MIN_VERSION:
        return f"Spark (pyspark 4) needs Java {JAVA_MIN_VERSION}+ but {java} is Java {major}: {fix}"
    return None


def check_java() -> None:
    """JavaNotFoundError with java_problem's line when there is no Java 17+."""
    problem = java_problem()
    if problem:
        raise JavaNotFoundError(problem)


def pyspark_module():
    try:
        import pyspark
    except ModuleNotFoundError as exc:
        raise SparkExtraMissing(_extra_message(exc)) from exc
    return pyspark


def fsspec_module():
    try:
        import fsspec
    except ModuleNotFoundError as exc:
        raise SparkExtraMissing(_extra_message(exc)) from exc
    return fsspec


def _extra_message(exc: ModuleNotFoundError) -> str:
    return (
        f'--engine spark needs the "spark" extra (module {exc.name!r} is missing): {install_command("spark")}'
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- progress


@dataclass(frozen=True)
class StageRow:
    """One Spark stage of a phase, as the status tracker and the UI's REST API report it."""

    phase: str
    stage_id: int
    name: str
    tasks: int
    failed: int
    seconds: float | None  # submission to completion; None without the UI
    task_seconds: float | None  # summed executor run time of its tasks
    shuffle_write: int | None  # bytes


class SparkRun:
    """A SparkContext plus the phases run on it: each phase is a job group, timed on the driver."""

    def __init__(self, sc: SparkContext, progress: bool):
        self.sc = sc
        self.progress = progress
        self.phases: list[tuple[str, str, float]] = []  # (name, job group, wall seconds)
        self._prefix = f"dynamo-cooccur-{uuid.uuid4().hex[:8]}"

    @contextmanager
    def phase(self, name: str, jobs: bool = True) -> Iterator[None]:
        """Time a phase; with `jobs`, its Spark jobs form a group and a failed task raises SparkEngineError."""
        from py4j.protocol import Py4JJavaError

        group = f"{self._prefix}-{len(self.phases)}"
        if jobs:
            self.sc.setJobGroup(group, f"dynamo-cooccur: {name}")
        started = time.perf_counter()
        try:
            yield
        except Py4JJavaError as exc:  # a task failed: its worker's error, in one line
            raise SparkEngineError(f"Spark job '{name}' failed: {_task_error(exc)}") from exc
        finally:
            if jobs:
                self.sc.setLocalProperty("spark.jobGroup.id", None)
            self.phases.append((name, group, time.perf_counter() - started))

    def stages(self) -> list[StageRow]:
        """Every stage of every phase so far, with times where the UI is on."""
        tracker, rest = self.sc.statusTracker(), _rest_stages(self.sc)
        rows = []
        for name, group, _ in self.phases:
            for job_id in sorted(tracker.getJobIdsForGroup(group)):
                job = tracker.getJobInfo(job_id)
                for stage_id in sorted(job.stageIds) if job else []:
                    info, extra = tracker.getStageInfo(stage_id), rest.get(stage_id, {})
                    if info is None or extra.get("status") == "SKIPPED":
                        continue
                    rows.append(
                        StageRow(
                            name,
                            stage_id,
                            re.sub(r" at \S*/", " at ", info.name),  # "collect at /long/path/x.py:12"
                            info.numTasks,
                            info.numFailedTasks,
                            _seconds(extra.get("submissionTime"), extra.get("completionTime")),
                            extra["executorRunTime"] / 1e3 if "executorRunTime" in extra else None,
                            extra.get("shuffleWriteBytes"),
                        )
                    )
        return rows


def format_stages(rows: Sequence[StageRow], phases: Sequence[tuple[str, str, float]]) -> str:
    """The end-of-run table: per phase its wall time, then its stages (many alike are summed in one line)."""
    lines = [
        "Spark stages:",
        f"  {'stage':>6} {'tasks':>6} {'failed':>6} {'wall':>8} {'task time':>10} {'shuffle':>10}",
    ]
    for name, _, wall in phases:
        lines.append(f"  {name}: {wall:.1f} s")
        mine = [r for r in rows if r.phase == name]
        if len(mine) > 3:  # the fetch jobs: one stage each
            mine = [_sum_rows(mine)]
        for r in mine:
            lines.append(
                f"  {r.stage_id if r.stage_id >= 0 else '':>6} {r.tasks:>6} {r.failed:>6} "
                f"{_fmt(r.seconds, 's'):>8} {_fmt(r.task_seconds, 's'):>10} {_fmt_bytes(r.shuffle_write):>10}  {r.name}"
            )
    stages, tasks = len(rows), sum(r.tasks for r in rows)
    lines.append(f"  total: {stages} stages, {tasks} tasks, {sum(w for _, _, w in phases):.1f} s")
    return "\n".join(lines)


def _sum_rows(rows: Sequence[StageRow]) -> StageRow:
    def total(values):
        values = list(values)
        return None if any(v is None for v in values) else sum(values)

    return StageRow(
        rows[0].phase,
        -1,
        f"{len(rows)} stages like {rows[0].name}",
        sum(r.tasks for r in rows),
        sum(r.failed for r in rows),
        total(r.seconds for r in rows),
        total(r.task_seconds for r in rows),
        total(r.shuffle_write for r in rows),
    )


def _rest_stages(sc: SparkContext) -> dict[int, dict]:
    """stageId -> the REST API's record of its latest attempt; {} without the UI."""
    if not sc.uiWebUrl:
        return {}
    url = f"{sc.uiWebUrl}/api/v1/applications/{sc.applicationId}/stages"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            stages = json.load(response)
    except (urllib.error.URLError, OSError, ValueError):
        return {}  # the table then shows tasks without times
    latest = {}
    for stage in sorted(stages, key=lambda s: s.get("attemptId", 0)):
        latest[stage["stageId"]] = stage
    return latest


def _seconds(submitted: str | None, completed: str | None) -> float | None:
    """Seconds between two REST API times such as '2026-12-05T08:14:32.740GMT'."""
    if not submitted or not completed:
        return None
    start, end = (
        datetime.strptime(t.replace("GMT", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z") for t in (submitted, completed)
    )
    return (end - start).total_seconds()


def _fmt(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value:.1f} {unit}"


def _fmt_bytes(value: int | None) -> str:
    return "-" if not value else f"{value / 1e6:.1f} MB"


def _task_error(exc: BaseException) -> str:
    """What failed, from the Java exception: the Python exception a worker raised, else the JVM's error."""
    text = str(exc)
    found = re.findall(r"^(\w+(?:\.\w+)*(?:Error|Exception)\b: .*)$", text, flags=re.MULTILINE)
    python = [line for line in found if not line.startswith(("org.", "java.", "py4j.", "scala."))]
    if python:
        return python[-1]
    if "java.lang.OutOfMemoryError" in text:
        return (
            "java.lang.OutOfMemoryError in a JVM: give it more heap (--spark-conf spark.driver.memory=4g in local "
            "mode, spark.executor.memory on a cluster) or lower --shard-tokens"
        )
    cause = re.search(r"(?:Caused by: )?((?:java|org|scala)\.[\w.$]+(?:Exception|Error)\b.*)", text)
    return cause[1] if cause else _first_line(exc)
