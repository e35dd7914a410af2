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


def ours(corpus: Path, tokenizer: Path, work: Path) -> dict[str, str]:
    """Document id -> the stage that dropped it ('' when kept)."""
    from llmops.api.dataset import Dataset
    from llmops_trainer.data import Options, run_local
    from llmops_trainer.data.steps import PIPELINE

    dataset = Dataset.model_validate(
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "Dataset",
            "metadata": {"name": "bench"},
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
    )
    run_local(dataset, work / "out", 1, options=Options(detect_language=False))
    import numpy as np

    decisions = np.load(work / "out" / ".work" / "decisions.npz")
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


def theirs(corpus: Path, tokenizer: Path, work: Path) -> dict[str, str]:
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

    def execute(steps: list[Any], name: str, tasks: int = 1) -> None:
        LocalPipelineExecutor(
            steps, tasks=tasks, workers=1, logging_dir=f"{w}/logs/{name}", skip_completed=False
        ).run()

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
    args = parser.parse_args()
    args.corpus.parent.mkdir(parents=True, exist_ok=True)
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


if __name__ == "__main__":
    sys.exit(main())
