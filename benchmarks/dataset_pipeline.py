"""Preprocessing throughput and decision agreement: llmops_trainer.data against HF datatrove.

Both engines run the same pipeline on the same real corpus (Debian's KJV Bible, fortunes,
Python's and Perl's documentation, at least 50 MB of text nobody here wrote):
Gopher quality filter -> Gopher repetition filter -> exact dedup -> MinHash dedup
(5-grams, 14 bands x 8 rows) -> tokenization with the same tokenizer.json.

Prints MB/s per core (corpus bytes / CPU seconds of the process and its children, so thread
and process pools count fully) for each engine, the ratio, and precision/recall/F1 of our
kept set against datatrove's after each rule and overall.

    pip install -e '.[trainer,bench]'        # datatrove + spaCy (its English word tokenizer)
    python benchmarks/dataset_pipeline.py    # installs the Debian packages when missing (root)

`--filters-only` compares the Gopher quality and repetition rules alone, document by
document (datatrove's filters called directly, no pipeline), on the corpus named by
`--kind`: `docs` (the corpus above: prose and documentation), `code` (every module of the
Python standard library: its source, and its docstrings as one document) or `short` (a
sample of the paragraphs of the docs corpus: short texts around the 50-word minimum).

    python benchmarks/dataset_pipeline.py --filters-only --kind code

`--sizes 100,1024` runs the engine at corpus scale, each stage the way its Job runs it: one
process per pod (`python -m llmops_trainer.data --config dataset.json --stage <stage>` with
JOB_COMPLETION_INDEX, LLMOPS_OUTPUT_DIR, LLMOPS_WORK_DIR and LLMOPS_NUM_SLICES), two pods of a
stage at a time, one slice per 32 MiB of corpus (the parallelism a user would set) and shards
of 8M tokens (a tokenize unit per slice), the pipeline above. For each size (MB) it generates a
corpus from the lines of the Debian documents that pass the Gopher rules (base documents of 20
to 60 random lines, so none is near another) with planted copies of random documents: 5% edited
(1, 2 or 3% of the words substituted, inserted or deleted), 1% verbatim, each a little after
its original (seeded; cached with its ground truth). It prints, per stage and end to end, the
pods' CPU seconds and wall time, MB/s per core (corpus bytes / the pods' CPU seconds, from each
pod's rusage) and the peak RSS of the largest pod (its ru_maxrss; the pods are started from a
small launcher process so that none inherits this one's size); the recall and precision of the
duplicate removals on the planted pairs; and, for the first size, datatrove on the same corpus
(each of its steps' CPU seconds against our stages', and its recall and precision). A table and
a `RESULT` JSON line per size; datatrove's log goes to stderr.

    python benchmarks/dataset_pipeline.py --sizes 100,1024 2>datatrove.log
"""

from __future__ import annotations

import argparse
import gzip
import html
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

PACKAGES = (
    "bible-kjv",
    "bible-kjv-text",
    "fortunes",
    "fortunes-min",
    "python3-doc",
    "perl-doc",
    "postgresql-doc-15",
    "linux-doc-6.1",
)
FORTUNES = Path("/usr/share/games/fortunes")
PYDOC = Path("/usr/share/doc")
PERLDOC = Path("/usr/share/perl")
PGDOC = Path("/usr/share/doc/postgresql-doc-15/html")
KERNELDOC = Path("/usr/share/doc/linux-doc-6.1/Documentation")
CACHE = Path(os.environ.get("LLMOPS_CACHE", Path.home() / ".cache" / "llmops")) / "bench"
MIN_MB = 50


def ensure_packages() -> None:
    missing = [
        p
        for p in PACKAGES
        if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0
    ]
    if not missing:
        return
    print(f"installing Debian packages: {' '.join(missing)}", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


class _Text(HTMLParser):
    """Visible text of an HTML page (scripts, styles and navigation left out)."""

    SKIP = frozenset({"script", "style", "nav", "head"})

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.depth = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self.SKIP:
            self.depth += 1
        elif tag in ("p", "div", "pre", "li", "h1", "h2", "h3", "tr", "br", "dt", "dd"):
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and self.depth:
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if not self.depth:
            self.parts.append(data)


def _html_text(path: Path) -> str:
    parser = _Text()
    parser.feed(path.read_text(errors="replace"))
    return re.sub(r"\n\s*\n+", "\n\n", html.unescape("".join(parser.parts))).strip()


def documents() -> Iterator[tuple[str, str]]:
    """(id, text) of every document of the corpus, in a fixed order."""
    bible = subprocess.run(
        ["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True
    ).stdout
    chapter: list[str] = []
    current = None
    for line in bible.splitlines():
        match = re.match(r"(\w+?\d*:)?(\w+?)(\d+):(\d+) (.*)", line)
        if not match:
            continue
        key = (match.group(2), match.group(3))
        if key != current and chapter:
            yield f"bible/{current[0]}{current[1]}", "\n".join(chapter)  # type: ignore[index]
            chapter = []
        current = key
        chapter.append(f"{match.group(4)} {match.group(5)}")
    if chapter and current:
        yield f"bible/{current[0]}{current[1]}", "\n".join(chapter)
    for path in sorted(FORTUNES.rglob("*")):
        if path.is_file() and path.suffix not in (".dat", ".u8") and not path.is_symlink():
            for n, fortune in enumerate(path.read_text(errors="replace").split("\n%\n")):
                if fortune.strip():
                    yield f"fortune/{path.name}/{n}", fortune.strip()
    # python3.X-doc's html folder is linked from several /usr/share/doc entries: read it once.
    for folder in sorted({p.resolve() for p in PYDOC.glob("python3.*/html")}):
        for path in sorted(folder.rglob("*.rst.txt")):
            yield f"pyrst/{path.relative_to(folder)}", path.read_text(errors="replace")
        for path in sorted(folder.rglob("*.html")):
            if "_sources" not in path.parts:
                yield f"pyhtml/{path.relative_to(folder)}", _html_text(path)
    for path in sorted(PERLDOC.rglob("*.pod")):
        text = path.read_text(errors="replace")
        # Long manuals split at their top-level headings, like pages of a site.
        for n, part in enumerate(re.split(r"\n(?==head1 )", text)):
            if part.strip():
                yield f"perlpod/{path.name}/{n}", part
    for path in sorted(PGDOC.glob("*.html")):
        yield f"pghtml/{path.name}", _html_text(path)
    for path in sorted(KERNELDOC.rglob("*")):
        if path.suffix == ".gz" and path.is_file():
            with gzip.open(path, "rt", errors="replace") as handle:
                yield f"kernel/{path.relative_to(KERNELDOC)}", handle.read()


def build_corpus(target: Path) -> int:
    if target.is_file():
        return target.stat().st_size
    ensure_packages()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with partial.open("w", encoding="utf-8") as out:
        for doc_id, text in documents():
            out.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
    partial.rename(target)
    return target.stat().st_size


def code_documents() -> Iterator[tuple[str, str]]:
    """Every module of this interpreter's standard library (tests and site-packages left out):
    its source, and its docstrings (module, classes, functions) as one document."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.parts[0] in ("site-packages", "test", "idlelib") or "tests" in relative.parts:
            continue
        source = path.read_text(errors="replace")
        yield f"stdlib/{relative}", source
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        nodes = [tree, *ast.walk(tree)]
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        docstrings = [ast.get_docstring(n) for n in nodes if isinstance(n, kinds)]
        text = "\n\n".join(dict.fromkeys(d for d in docstrings if d))
        if text:
            yield f"stdlib-doc/{relative}", text


def short_documents(corpus: Path, every: int = 20) -> Iterator[tuple[str, str]]:
    """Every `every`-th paragraph of the docs corpus with 20 to 200 whitespace-separated words."""
    count = 0
    with corpus.open() as handle:
        for line in handle:
            record = json.loads(line)
            for n, paragraph in enumerate(re.split(r"\n\s*\n", record["text"])):
                if 20 <= len(paragraph.split()) <= 200:
                    count += 1
                    if count % every == 0:
                        yield f"{record['id']}#{n}", paragraph.strip()


def build_kind(kind: str, docs: Path) -> Path:
    """The corpus of `kind` (docs: the default corpus), built once into the cache."""
    if kind == "docs":
        build_corpus(docs)
        return docs
    target = docs.parent / f"corpus-{kind}.jsonl"
    if not target.is_file():
        build_corpus(docs)
        made = code_documents() if kind == "code" else short_documents(docs)
        partial = target.with_suffix(".partial")
        with partial.open("w", encoding="utf-8") as out:
            for doc_id, text in made:
                out.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
        partial.rename(target)
    return target


def filter_fates(corpus: Path) -> tuple[dict[str, str], dict[str, str], float, float]:
    """Document id -> the Gopher rule that dropped it ('' when kept), ours and datatrove's
    (quality, then repetition), with the CPU seconds each engine took."""
    from datatrove.data import Document as TheirDocument
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter

    from llmops.api.dataset import QualityFilters
    from llmops_trainer.data import filters

    records = [json.loads(line) for line in corpus.open()]
    rules = filters.QualityRules.from_spec(QualityFilters.model_validate(GOPHER_SPEC))

    def our_fate(text: str) -> str:
        if not text:  # datatrove's quality filter drops empty documents as too short
            return "gopher_short_doc"
        return filters.gopher_quality(text, rules) or filters.gopher_repetition(text, rules) or ""

    quality, repetition = GopherQualityFilter(), GopherRepetitionFilter()

    def their_fate(text: str) -> str:
        document = TheirDocument(text=text, id="")
        for step in (quality, repetition):
            verdict = step.filter(document)
            if verdict is not True:
                return verdict[1] if isinstance(verdict, tuple) else step.name
        return ""

    our, _, our_cpu = measure(lambda: {r["id"]: our_fate(r["text"]) for r in records})
    their, _, their_cpu = measure(lambda: {r["id"]: their_fate(r["text"]) for r in records})
    return our, their, our_cpu, their_cpu


def kept_agreement(our: dict[str, str], their: dict[str, str]) -> tuple[float, float, float]:
    ours_kept = {k for k, v in our.items() if not v}
    their_kept = {k for k, v in their.items() if not v}
    both = len(ours_kept & their_kept)
    precision = both / len(ours_kept) if ours_kept else 1.0
    recall = both / len(their_kept) if their_kept else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(run: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = run()
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


def train_tokenizer(corpus: Path, target: Path) -> None:
    from llmops.api.dataset import TokenizerTraining
    from llmops_trainer.data import tokenize

    def sample() -> Iterator[str]:
        with corpus.open() as handle:
            for n, line in enumerate(handle):
                if n % 4 == 0:
                    yield json.loads(line)["text"]

    tokenize.train(sample(), TokenizerTraining(vocab_size=8192)).save(str(target))


STAGES = ("quality", "repetition", "exact", "near")
# Gopher's published thresholds, as datatrove's filters default to.
GOPHER_SPEC = {
    "minWords": 50,
    "maxWords": 100000,
    "maxSymbolRatio": 0.1,
    "minAlphaWordRatio": 0.8,
    "maxDuplicateLineRatio": 0.3,
}


def comparison_dataset(corpus: Path, tokenizer: Path) -> dict[str, Any]:
    """The Dataset that runs datatrove's pipeline: Gopher filters, exact dedup, MinHash
    5-grams 14 x 8, the given tokenizer, everything in the training split."""
    return {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "Dataset",
        "metadata": {"name": "bench", "namespace": "default"},
        "spec": {
            "sources": [{"name": "corpus", "path": str(corpus), "format": "jsonl"}],
            "processing": {
                # datatrove's pipeline neither normalizes nor scrubs: nor do we here.
                "normalization": {"unicode": "none", "collapseWhitespace": False},
                "deduplication": {
                    "exact": True,
                    "near": {
                        "numPermutations": 112,
                        "bands": 14,
                        "shingleSize": 5,
                        # datatrove accepts every LSH candidate pair; the smallest threshold
                        # the API allows does the same.
                        "threshold": 1e-6,
                    },
                },
                "filters": GOPHER_SPEC,
                "pii": {"enabled": False},
            },
            "tokenizer": {"path": str(tokenizer)},
            "split": {"train": 1.0, "validation": 0.0, "test": 0.0},
        },
    }


def ours(corpus: Path, tokenizer: Path, work: Path) -> dict[str, str]:
    """Document id -> the stage that dropped it ('' when kept)."""
    from llmops.api.dataset import Dataset
    from llmops_trainer.data import Options, run_local
    from llmops_trainer.data.steps import PIPELINE

    dataset = Dataset.model_validate(comparison_dataset(corpus, tokenizer))
    run_local(dataset, work / "out", 1, options=Options(detect_language=False))
    from llmops_trainer.data.pipeline import decisions as joined_decisions

    decisions = joined_decisions(work / "out" / ".work", 1)
    reasons = [str(r) for r in decisions["reasons"]]
    ids = [json.loads(line)["id"] for line in corpus.open()]
    fate = {}
    for position, code in zip(
        decisions["positions"].tolist(), decisions["codes"].tolist(), strict=True
    ):
        fate[ids[position]] = "" if code == 0 else STAGE_OF_STEP[PIPELINE.step_of(reasons[code])]
    return fate


# Our steps as datatrove's stages (it drops empty documents in its quality filter).
STAGE_OF_STEP = {
    "normalize": "quality",
    "filter-quality": "quality",
    "filter-repetition": "repetition",
    "dedup-exact": "exact",
    "dedup-near": "near",
}


def theirs(
    corpus: Path, tokenizer: Path, work: Path, steps: dict[str, float] | None = None
) -> dict[str, str]:
    """Document id -> the stage that dropped it ('' when kept); `steps` gets the CPU seconds
    of each of the pipeline's steps (1 to 6)."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    def content(doc: Any) -> bytes:  # datatrove's xxhash path hashes bytes
        return str(doc.text).encode("utf-8")

    exact = ExactDedupConfig(content_getter=content)
    # datatrove's xxhash shingle path is handed str and fails; its sha1 path works.
    minhash = MinhashConfig(
        n_grams=5, num_buckets=14, hashes_per_bucket=8, hash_config=HashConfig(hash_fc="sha1")
    )
    w = str(work)

    def reader(folder: str) -> JsonlReader:
        return JsonlReader(folder, glob_pattern="*.jsonl*")

    def excluded(name: str) -> JsonlWriter:
        return JsonlWriter(f"{w}/excluded/{name}", compression=None)

    def execute(pipeline: list[Any], name: str, tasks: int = 1) -> None:
        started = cpu_seconds()
        LocalPipelineExecutor(
            pipeline, tasks=tasks, workers=1, logging_dir=f"{w}/logs/{name}", skip_completed=False
        ).run()
        if steps is not None:
            steps[name] = cpu_seconds() - started

    corpus_dir = work / "input"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    (corpus_dir / "corpus.jsonl").symlink_to(corpus)
    execute(
        [
            reader(str(corpus_dir)),
            GopherQualityFilter(exclusion_writer=excluded("quality")),
            GopherRepetitionFilter(exclusion_writer=excluded("repetition")),
            JsonlWriter(f"{w}/filtered", compression=None),
            ExactDedupSignature(f"{w}/exact_sigs", config=exact),
        ],
        "1",
    )
    execute([ExactFindDedups(f"{w}/exact_sigs", f"{w}/exact_dups", config=exact)], "2")
    execute(
        [
            reader(f"{w}/filtered"),
            ExactDedupFilter(f"{w}/exact_dups", config=exact, exclusion_writer=excluded("exact")),
            JsonlWriter(f"{w}/unique", compression=None),
            MinhashDedupSignature(f"{w}/mh_sigs", config=minhash),
        ],
        "3",
    )
    # The bucket stage runs one task per bucket (one after another: workers=1).
    buckets = MinhashDedupBuckets(f"{w}/mh_sigs", f"{w}/mh_buckets", config=minhash)
    execute([buckets], "4", tasks=minhash.num_buckets)
    execute([MinhashDedupCluster(f"{w}/mh_buckets", f"{w}/mh_ids", config=minhash)], "5")
    execute(
        [
            reader(f"{w}/unique"),
            MinhashDedupFilter(f"{w}/mh_ids", exclusion_writer=excluded("near")),
            DocumentTokenizer(
                f"{w}/tokens", tokenizer_name_or_path=str(tokenizer), eos_token="<|endoftext|>"
            ),
        ],
        "6",
    )
    fate = {json.loads(line)["id"]: "" for line in corpus.open()}
    for stage in STAGES:
        for path in (work / "excluded" / stage).glob("*.jsonl*"):
            for line in path.open():
                fate[json.loads(line)["id"]] = stage
    return fate


def agreement(
    our: dict[str, str], their: dict[str, str]
) -> list[tuple[str, float, float, float, int, int]]:
    """Per rule (cumulative: documents kept after that rule) and overall."""
    rows = []
    for n, stage in enumerate(STAGES):
        dropped_by = set(STAGES[: n + 1])
        ours_kept = {k for k, v in our.items() if v not in dropped_by}
        their_kept = {k for k, v in their.items() if v not in dropped_by}
        both = len(ours_kept & their_kept)
        precision = both / len(ours_kept) if ours_kept else 1.0
        recall = both / len(their_kept) if their_kept else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append((stage, precision, recall, f1, len(ours_kept), len(their_kept)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=CACHE / "corpus.jsonl")
    parser.add_argument("--skip-datatrove", action="store_true")
    parser.add_argument("--show-disagreements", type=int, default=3)
    parser.add_argument(
        "--filters-only",
        action="store_true",
        help="compare the Gopher quality and repetition rules alone, document by document",
    )
    parser.add_argument("--kind", choices=("docs", "code", "short"), default="docs")
    parser.add_argument(
        "--sizes",
        default="",
        help="corpus scale: MB of each generated corpus (e.g. 100,1000), stages as the Jobs run",
    )
    parser.add_argument("--scratch", default="", help="folder for the runs' work (default: /tmp)")
    parser.add_argument("--launcher", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.corpus.parent.mkdir(parents=True, exist_ok=True)
    if args.launcher:
        return launcher()
    if args.sizes:
        return scale(args)
    if args.filters_only:
        return filters_only(build_kind(args.kind, args.corpus), args.show_disagreements)
    size = build_corpus(args.corpus)
    documents_count = sum(1 for _ in args.corpus.open())
    print(f"corpus: {size / 1e6:.1f} MB, {documents_count} documents ({args.corpus})")
    if size < MIN_MB * 1e6:
        print(f"warning: corpus below {MIN_MB} MB")
    tokenizer = args.corpus.parent / "tokenizer.json"
    if not tokenizer.is_file():
        train_tokenizer(args.corpus, tokenizer)
    print(f"machine: {os.cpu_count()} cores; {sys.version.split()[0]}")

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        our, wall, cpu = measure(lambda: ours(args.corpus, tokenizer, root / "ours"))
        ours_rate = size / 1e6 / cpu
        print(f"llmops:    {wall:7.1f} s wall, {cpu:7.1f} s CPU, {ours_rate:6.2f} MB/s per core")
        if args.skip_datatrove:
            return 0
        their, wall, cpu = measure(lambda: theirs(args.corpus, tokenizer, root / "datatrove"))
        their_rate = size / 1e6 / cpu
        print(f"datatrove: {wall:7.1f} s wall, {cpu:7.1f} s CPU, {their_rate:6.2f} MB/s per core")
        print(f"ratio (per core): {ours_rate / their_rate:.2f}x   (goal >= 3x)")
        print("\nkept-set agreement, cumulative after each rule (goal F1 >= 0.95):")
        print(f"{'rule':<12}{'precision':>10}{'recall':>9}{'F1':>8}{'ours':>9}{'datatrove':>11}")
        for stage, p, r, f, a, b in agreement(our, their):
            print(f"{stage:<12}{p:>10.4f}{r:>9.4f}{f:>8.4f}{a:>9}{b:>11}")
        final = agreement(our, their)[-1]
        print(f"{'overall':<12}{final[1]:>10.4f}{final[2]:>9.4f}{final[3]:>8.4f}")
        mismatched: dict[tuple[str, str], list[str]] = {}
        for key, value in our.items():
            if value != their.get(key):
                mismatched.setdefault((value or "kept", their.get(key) or "kept"), []).append(key)
        print("\ndisagreements (ours -> datatrove): count, examples")
        for (a, b), keys in sorted(mismatched.items(), key=lambda x: -len(x[1])):
            print(f"  {a:>10} vs {b:<10} {len(keys):6}  {keys[: args.show_disagreements]}")
        shutil.rmtree(root, ignore_errors=True)
    return 0


def filters_only(corpus: Path, show: int) -> int:
    documents_count = sum(1 for _ in corpus.open())
    size = corpus.stat().st_size
    print(f"corpus: {size / 1e6:.1f} MB, {documents_count} documents ({corpus})")
    print(f"machine: {os.cpu_count()} cores; {sys.version.split()[0]}")
    our, their, our_cpu, their_cpu = filter_fates(corpus)
    print(f"CPU seconds: llmops {our_cpu:.1f}, datatrove {their_cpu:.1f}")
    precision, recall, f1 = kept_agreement(our, their)
    kept = sum(1 for v in our.values() if not v), sum(1 for v in their.values() if not v)
    print("Gopher quality + repetition, kept-set agreement (goal F1 >= 0.95):")
    print(
        f"  precision {precision:.4f}  recall {recall:.4f}  F1 {f1:.4f}  kept {kept[0]} / {kept[1]}"
    )
    mismatched: dict[tuple[str, str], list[str]] = {}
    for key, value in our.items():
        if value != their[key]:
            mismatched.setdefault((value or "kept", their[key] or "kept"), []).append(key)
    print("disagreements (ours vs datatrove): count, examples")
    for (a, b), keys in sorted(mismatched.items(), key=lambda x: -len(x[1])):
        print(f"  {a:>28} vs {b:<28} {len(keys):6}  {keys[:show]}")
    return 0


# -- corpus scale: the stages as the Jobs run them, at two sizes ---------------------------------

SCALE_SEED = 20261201
COPY_RATE = 0.05  # share of the base documents followed, later, by an edited copy
EXACT_RATE = 0.01  # share followed by a verbatim copy
EDIT_RATES = (0.01, 0.02, 0.03)  # words changed, inserted or deleted per copy (drawn evenly)
COPY_DELAY = 2000  # a copy comes 1 to this many documents after its original
SLICE_TARGET = 32 << 20  # bytes of corpus per slice: the parallelism a user would set
POD_SLOTS = 2  # pods of one stage running at a time
STAGE_ORDER = ("slice", "dedup", "prepare", "tokenize", "finalize")


def line_pool(corpus: Path) -> list[str]:
    """The distinct lines (3 words or more, at most 1,000 characters) of the documents of
    the Debian corpus that pass the Gopher rules (so that most generated documents do too),
    in corpus order; cached next to the corpus."""
    cached = corpus.parent / "scale-lines.json"
    if cached.is_file():
        pool: list[str] = json.loads(cached.read_text())
        return pool
    from llmops.api.dataset import QualityFilters
    from llmops_trainer.data import filters

    rules = filters.QualityRules.from_spec(QualityFilters.model_validate(GOPHER_SPEC))
    seen: dict[str, None] = {}
    with corpus.open() as handle:
        for record in handle:
            text = json.loads(record)["text"]
            if not text or filters.gopher_quality(text, rules):
                continue
            if filters.gopher_repetition(text, rules):
                continue
            for line in text.splitlines():
                line = line.strip()
                if len(line) <= 1000 and len(line.split()) >= 3:
                    seen.setdefault(line, None)
    cached.write_text(json.dumps(list(seen)))
    return list(seen)


def edit_words(text: str, rate: float, rng: Any, vocabulary: list[str]) -> str:
    """`text` with round(rate x words) (at least 1) distinct words each substituted, doubled
    by a random word inserted after it, or deleted, evenly; whitespace kept."""
    parts = re.split(r"(\s+)", text)
    words = [i for i in range(0, len(parts), 2) if parts[i]]
    if not words:
        return text
    for i in rng.sample(words, min(len(words), max(1, round(rate * len(words))))):
        operation = rng.randrange(3)
        if operation == 0:
            parts[i] = rng.choice(vocabulary)
        elif operation == 1:
            parts[i] = f"{parts[i]} {rng.choice(vocabulary)}"
        else:
            parts[i] = ""
    return "".join(parts)


def build_scale_corpus(pool: list[str], target_bytes: int, path: Path) -> dict[str, Any]:
    """A jsonl corpus of about `target_bytes`: base documents of 20 to 60 lines drawn at
    random (seeded) from the Debian lines, in paragraphs of about 4 lines, so that no two
    base documents are near each other, and planted copies (see the rates above), each 1
    to COPY_DELAY documents after its original. Returns the ground truth: per copy, the
    line numbers and the edit rate (0 for verbatim copies); cached next to the corpus."""
    import heapq
    import random

    truth_path = path.with_suffix(".truth.json")
    if path.is_file() and truth_path.is_file():
        truth: dict[str, Any] = json.loads(truth_path.read_text())
        return truth
    rng = random.Random(SCALE_SEED)
    vocabulary = sorted({w for p in pool[:: max(1, len(pool) // 20000)] for w in p.split()})
    pending: list[tuple[int, int, str, int, float]] = []  # (due, order, text, original, rate)
    pairs: list[list[Any]] = []
    written, line, order = 0, 0, 0
    partial = path.with_suffix(".partial")
    with partial.open("w", encoding="utf-8") as out:

        def emit(doc_id: str, text: str) -> None:
            nonlocal written, line
            record = json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n"
            out.write(record)
            written += len(record.encode("utf-8"))
            line += 1

        while written < target_bytes or pending:
            if pending and (pending[0][0] <= line or written >= target_bytes):
                _, _, text, original, rate = heapq.heappop(pending)
                pairs.append([original, line, rate])
                emit(f"copy/{line}/of/{original}", text)
                continue
            lines = rng.choices(pool, k=rng.randint(20, 60))
            cuts = sorted(rng.sample(range(1, len(lines)), len(lines) // 4))
            text = "\n\n".join(
                "\n".join(lines[a:b]) for a, b in zip([0, *cuts], [*cuts, len(lines)], strict=True)
            )
            original = line
            emit(f"base/{line}", text)
            draw = rng.random()
            if draw < COPY_RATE + EXACT_RATE:
                rate = 0.0 if draw < EXACT_RATE else rng.choice(EDIT_RATES)
                copy = edit_words(text, rate, rng, vocabulary) if rate else text
                order += 1
                due = line + rng.randint(1, COPY_DELAY)
                heapq.heappush(pending, (due, order, copy, original, rate))
    partial.rename(path)
    truth = {"documents": line, "bytes": written, "pairs": pairs}
    truth_path.write_text(json.dumps(truth))
    return truth


def scale_dataset(corpus: Path, tokenizer: Path, slices: int) -> dict[str, Any]:
    """The Dataset the stages run: the pipeline the datatrove comparison runs, with
    `slices` pods (parallelism) of SLICE_TARGET bytes each and shards of about as much."""
    body = comparison_dataset(corpus, tokenizer)
    body["spec"].update(
        {
            # A tokenize unit is a shard's worth of text (4 bytes a token): shards of about a
            # slice, so that every tokenize pod has a unit (the default, 100M tokens, makes
            # units of 400 MB: one busy pod below that).
            "sharding": {"tokensPerShard": SLICE_TARGET // 4},
            "parallelism": slices,
            "sliceBytes": SLICE_TARGET,
        }
    )
    return body


def run_pods(
    stage: str, indexes: list[int], config: Path, env: dict[str, str], logs: Path
) -> list[dict[str, float]]:
    """The pods of one stage, POD_SLOTS at a time, each `python -m llmops_trainer.data` in a
    process of its own; per pod its CPU seconds and peak RSS (the child's rusage)."""
    waiting = list(indexes)
    running: dict[int, tuple[int, subprocess.Popen[bytes], float]] = {}
    pods: list[dict[str, float]] = []
    while waiting or running:
        while waiting and len(running) < POD_SLOTS:
            index = waiting.pop(0)
            stage_arg = ("--stage", stage)
            log = (logs / f"{stage}-{index:05d}.log").open("wb")
            argv = [
                sys.executable,
                "-m",
                "llmops_trainer.data",
                "--config",
                str(config),
                *stage_arg,
            ]
            if not stage:  # an empty pod: the imports only
                argv = [sys.executable, "-c", "import llmops_trainer.data.__main__"]
            process = subprocess.Popen(
                argv,
                env={**env, "JOB_COMPLETION_INDEX": str(index)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()
            running[process.pid] = (index, process, time.perf_counter())
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        index, process, started = running.pop(pid)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            tail = (logs / f"{stage}-{index:05d}.log").read_text()[-3000:]
            raise RuntimeError(f"{stage} pod {index} failed ({process.returncode}):\n{tail}")
        pods.append(
            {
                "index": index,
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "rss_mb": usage.ru_maxrss / 1024,
                "wall_s": time.perf_counter() - started,
            }
        )
    return pods


class Launcher:
    """Starts the pods from a small process of its own, started before this one grows: a
    process's peak RSS (ru_maxrss) starts at its parent's RSS when forked and survives the
    exec, so pods forked from this process (corpus, datatrove) would report its size."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--launcher"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, **request: Any) -> list[dict[str, float]]:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        if "error" in answer:
            raise RuntimeError(answer["error"])
        pods: list[dict[str, float]] = answer["pods"]
        return pods

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait()


def launcher() -> int:
    """The launcher's side: one request per line (run_pods' arguments), one answer per line."""
    for line in sys.stdin:
        request = json.loads(line)
        try:
            pods = run_pods(
                request["stage"],
                request["indexes"],
                Path(request["config"]),
                request["env"],
                Path(request["logs"]),
            )
            print(json.dumps({"pods": pods}), flush=True)
        except Exception as error:  # reported to the benchmark process
            print(json.dumps({"error": str(error)}), flush=True)
    return 0


def pod_baseline(pods: Launcher, scratch: Path) -> dict[str, float]:
    """What a pod costs before any work: the interpreter and the engine's imports."""
    (scratch / "logs").mkdir(parents=True, exist_ok=True)
    found = pods.run(stage="", indexes=[0], config="", env=dict(os.environ), logs=str(scratch))
    return found[0]


def run_stages(
    corpus: Path, tokenizer: Path, work: Path, launcher: Launcher
) -> tuple[dict[str, Any], int]:
    """Every stage of the engine over `corpus`, as the Jobs run them; per stage the pods'
    figures. Returns them and the slice count."""
    from llmops.api.dataset import Dataset, dedup_groups

    size = corpus.stat().st_size
    slices = max(1, -(-size // SLICE_TARGET))
    spec = scale_dataset(corpus, tokenizer, slices)
    groups = dedup_groups(Dataset.model_validate(spec).spec)
    work.mkdir(parents=True, exist_ok=True)
    config = work / "dataset.json"
    config.write_text(json.dumps(spec))
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "LLMOPS_OUTPUT_DIR": str(work / "out"),
        "LLMOPS_WORK_DIR": str(work / "out" / ".work"),
        "LLMOPS_NUM_SLICES": str(slices),
        "LLMOPS_TERMINATION_LOG": str(work / "termination.log"),
    }
    counts = {"slice": slices, "dedup": groups, "prepare": 1, "tokenize": slices, "finalize": 1}
    stages: dict[str, Any] = {}
    for stage in STAGE_ORDER:
        started = time.perf_counter()
        pods = launcher.run(
            stage=stage,
            indexes=list(range(counts[stage])),
            config=str(config),
            env=env,
            logs=str(logs),
        )
        stages[stage] = {"pods": pods, "wall_s": time.perf_counter() - started}
        print(
            f"  {stage:<9} {len(pods):3} pods  {stages[stage]['wall_s']:7.1f} s wall  "
            f"{sum(p['cpu_s'] for p in pods):7.1f} s CPU  "
            f"peak RSS {max(p['rss_mb'] for p in pods):6.0f} MB  (load {os.getloadavg()[0]:.1f})",
            flush=True,
        )
    return stages, slices


def planted_scores(fate: list[str], truth: dict[str, Any]) -> dict[str, Any]:
    """Recall and precision of the duplicate removals against the planted copies. `fate`:
    per line of the corpus, 'exact' or 'near' (removed as a duplicate), 'other' (dropped by
    another rule) or '' (kept). A pair counts when neither document was dropped by another
    rule (a filter dropping one of them leaves no duplicate to find); it is found when
    either document was removed as a duplicate. Precision: the duplicate removals that are
    a planted document, over all of them."""
    planted: set[int] = set()
    eligible: dict[float, int] = {}
    found: dict[float, int] = {}
    for original, copy, rate in truth["pairs"]:
        planted.update((original, copy))
        if "other" in (fate[original], fate[copy]):
            continue
        eligible[rate] = eligible.get(rate, 0) + 1
        if fate[original] in ("exact", "near") or fate[copy] in ("exact", "near"):
            found[rate] = found.get(rate, 0) + 1
    removed = [n for n, f in enumerate(fate) if f in ("exact", "near")]
    true = sum(1 for n in removed if n in planted)
    total_eligible = sum(eligible.values())
    return {
        "pairs": len(truth["pairs"]),
        "eligible": total_eligible,
        "recall": sum(found.values()) / total_eligible if total_eligible else 1.0,
        "recall_by_edit_rate": {
            f"{rate:g}": round(found.get(rate, 0) / count, 4)
            for rate, count in sorted(eligible.items())
        },
        "removed_as_duplicates": len(removed),
        "precision": true / len(removed) if removed else 1.0,
        "false_removals": len(removed) - true,
    }


def our_fates(work: Path, slices: int, documents_count: int) -> list[str]:
    from llmops_trainer.data.pipeline import decisions
    from llmops_trainer.data.steps import EXACT, NEAR

    found = decisions(work / "out" / ".work", slices)
    reasons = [str(r) for r in found["reasons"]]
    names = {EXACT: "exact", NEAR: "near"}
    fate = [""] * documents_count
    for position, code in zip(found["positions"].tolist(), found["codes"].tolist(), strict=True):
        if code:
            fate[position] = names.get(reasons[code], "other")
    return fate


def their_fates(fate_by_id: dict[str, str], corpus: Path) -> list[str]:
    names = {"exact": "exact", "near": "near"}
    with corpus.open() as handle:
        ids = [json.loads(line)["id"] for line in handle]
    return [names.get(fate_by_id[i], "other") if fate_by_id[i] else "" for i in ids]


# Our stages against datatrove's pipeline steps (theirs(): 1 read + Gopher filters + write +
# exact signatures, 3 exact filter + MinHash signatures, 2/4/5 the dedup joins, 6 tokenize).
GROUPS = {
    "filter": (("slice",), ("1", "3")),
    "dedup": (("dedup", "prepare"), ("2", "4", "5")),
    "tokenize": (("tokenize", "finalize"), ("6",)),
}


def scale(args: argparse.Namespace) -> int:
    size_mb = [int(s) for s in args.sizes.split(",")]
    pods = Launcher()  # first, while this process is small
    pool_corpus = args.corpus
    build_corpus(pool_corpus)
    tokenizer = pool_corpus.parent / "tokenizer.json"
    if not tokenizer.is_file():
        train_tokenizer(pool_corpus, tokenizer)
    pool: list[str] = []
    cores = os.cpu_count()
    scratch_root = Path(args.scratch) if args.scratch else None
    with tempfile.TemporaryDirectory(dir=scratch_root) as scratch:
        baseline = pod_baseline(pods, Path(scratch))
    print(
        f"machine: {cores} cores; {sys.version.split()[0]}; pods {POD_SLOTS} at a time; "
        f"slices of {SLICE_TARGET >> 20} MiB; an empty pod (imports only): "
        f"{baseline['cpu_s']:.2f} s CPU, {baseline['rss_mb']:.0f} MB RSS"
    )
    results = []
    for number, mb in enumerate(size_mb):
        corpus = pool_corpus.parent / f"scale-{mb}MB.jsonl"
        if not (corpus.is_file() and corpus.with_suffix(".truth.json").is_file()):
            pool = pool or line_pool(pool_corpus)
        truth = build_scale_corpus(pool, mb * 10**6, corpus)
        size = corpus.stat().st_size
        copies = sum(1 for p in truth["pairs"] if p[2])
        print(
            f"\ncorpus {corpus.name}: {size / 1e6:.0f} MB, {truth['documents']} documents, "
            f"{copies} edited and {len(truth['pairs']) - copies} verbatim copies planted "
            f"(load {os.getloadavg()[0]:.1f})",
            flush=True,
        )
        with tempfile.TemporaryDirectory(dir=scratch_root) as scratch:
            root = Path(scratch)
            loads = [os.getloadavg()[0]]
            stages, slices = run_stages(corpus, tokenizer, root / "ours", pods)
            loads.append(os.getloadavg()[0])
            fate = our_fates(root / "ours", slices, truth["documents"])
            scores = planted_scores(fate, truth)
            shutil.rmtree(root / "ours", ignore_errors=True)
            result: dict[str, Any] = {
                "corpus_mb": round(size / 1e6, 1),
                "documents": truth["documents"],
                "slices": slices,
                "stages": {},
                "planted": scores,
            }
            total_cpu = total_wall = 0.0
            for stage, figures in stages.items():
                cpu = sum(p["cpu_s"] for p in figures["pods"])
                total_cpu += cpu
                total_wall += figures["wall_s"]
                result["stages"][stage] = {
                    "pods": len(figures["pods"]),
                    "cpu_s": round(cpu, 1),
                    "wall_s": round(figures["wall_s"], 1),
                    "mb_per_s_per_core": round(size / 1e6 / cpu, 2),
                    "peak_rss_mb": round(max(p["rss_mb"] for p in figures["pods"])),
                    "median_rss_mb": round(
                        sorted(p["rss_mb"] for p in figures["pods"])[len(figures["pods"]) // 2]
                    ),
                }
            result["end_to_end"] = {
                "cpu_s": round(total_cpu, 1),
                "wall_s": round(total_wall, 1),
                "mb_per_s_per_core": round(size / 1e6 / total_cpu, 2),
            }
            run_datatrove = number == 0 and not args.skip_datatrove
            if run_datatrove:
                steps: dict[str, float] = {}
                started = cpu_seconds()
                fate_by_id = theirs(corpus, tokenizer, root / "datatrove", steps)
                their_cpu = cpu_seconds() - started
                loads.append(os.getloadavg()[0])
                result["datatrove"] = {
                    "cpu_s": round(their_cpu, 1),
                    "mb_per_s_per_core": round(size / 1e6 / their_cpu, 2),
                    "steps_cpu_s": {k: round(v, 1) for k, v in steps.items()},
                    "planted": planted_scores(their_fates(fate_by_id, corpus), truth),
                }
                ratios = {"end_to_end": their_cpu / total_cpu}
                for name, (mine, their_steps) in GROUPS.items():
                    ours_cpu = sum(result["stages"][s]["cpu_s"] for s in mine)
                    ratios[name] = sum(steps[s] for s in their_steps) / ours_cpu
                result["ratio_to_datatrove_per_core"] = {k: round(v, 2) for k, v in ratios.items()}
            result["load_average"] = [round(x, 1) for x in loads]
        print_scale(result)
        print("RESULT " + json.dumps(result), flush=True)
        results.append(result)
    if len(results) > 1:
        print("\npeak RSS per pod, smallest -> largest corpus (MB):")
        for stage in STAGE_ORDER:
            row = " -> ".join(str(r["stages"][stage]["peak_rss_mb"]) for r in results)
            print(f"  {stage:<9} {row}")
    if any("datatrove" not in r for r in results) and not args.skip_datatrove:
        print("datatrove ran on the smallest corpus only (too slow at the larger sizes here)")
    pods.close()
    return 0


def print_scale(result: dict[str, Any]) -> None:
    print(
        f"\n{result['corpus_mb']:.0f} MB, {result['slices']} slices "
        f"(load average {'/'.join(str(x) for x in result['load_average'])}):"
    )
    print(f"{'stage':<10}{'pods':>5}{'CPU s':>9}{'wall s':>9}{'MB/s/core':>11}{'RSS/pod MB':>12}")
    for stage, s in result["stages"].items():
        print(
            f"{stage:<10}{s['pods']:>5}{s['cpu_s']:>9.1f}{s['wall_s']:>9.1f}"
            f"{s['mb_per_s_per_core']:>11.2f}{s['peak_rss_mb']:>12}"
        )
    e = result["end_to_end"]
    print(f"{'all':<10}{'':>5}{e['cpu_s']:>9.1f}{e['wall_s']:>9.1f}{e['mb_per_s_per_core']:>11.2f}")
    if "datatrove" in result:
        d = result["datatrove"]
        ratios = result["ratio_to_datatrove_per_core"]
        print(
            f"datatrove: {d['cpu_s']:.1f} s CPU, {d['mb_per_s_per_core']:.2f} MB/s per core; "
            "ours / datatrove per core: "
            + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
            + "   (goal filter >= 5x)"
        )
    for name, p in [("llmops", result["planted"])] + (
        [("datatrove", result["datatrove"]["planted"])] if "datatrove" in result else []
    ):
        print(
            f"planted duplicates, {name}: recall {p['recall']:.4f} "
            f"(by edit rate {p['recall_by_edit_rate']}), precision {p['precision']:.4f}, "
            f"{p['eligible']}/{p['pairs']} pairs counted, {p['false_removals']} other "
            "documents removed as duplicates   (goal >= 0.95)"
        )


if __name__ == "__main__":
    sys.exit(main())
