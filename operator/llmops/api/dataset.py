"""Dataset: collect text, clean, dedupe, filter, augment, tokenize, shard and split it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, StringConstraints, field_validator

from llmops.api.base import (
    ApiModel,
    Rule,
    StatusModel,
    cel_exactly_one,
    distinct,
    exactly_one,
    nested,
)
from llmops.api.common import (
    Condition,
    LocalObjectReference,
    Name,
    ObjectMeta,
    Path,
    PretrainedModel,
    Resources,
    S3Location,
    Scheduling,
    SecretKeySelector,
    Storage,
    conditions_field,
)

MAX_SOURCES = 64
MAX_URLS = 100
SourceFormat = Literal["text", "jsonl", "parquet"]
SplitName = Literal["train", "validation", "test"]
EvaluationSplit = Literal["validation", "test"]
EVALUATION_SPLITS: tuple[EvaluationSplit, ...] = ("validation", "test")
Url = Annotated[str, StringConstraints(pattern=r"^https?://[^\s]+$", max_length=2048)]
LanguageCode = Annotated[str, StringConstraints(pattern=r"^[a-z]{2,3}$", max_length=3)]
# A relative glob over "/"-separated paths (`*`, `?`, `[...]` inside a segment; `**` spans them).
GlobPattern = Annotated[str, StringConstraints(pattern=r"^[^/\x00][^\x00]*$", max_length=512)]
SpecialToken = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class VolumeSource(ApiModel):
    """Files on an existing PersistentVolumeClaim."""

    claim_name: Name = Field(description="Name of the PersistentVolumeClaim.")
    path: str = Field(
        default="",
        description="File or folder inside the volume; empty means the volume root.",
        max_length=4096,
    )


class HubDatasetSource(ApiModel):
    """A dataset repository on the Hugging Face Hub (or a mirror of it)."""

    repo: str = Field(
        description="Repository id, `<org>/<name>` (e.g. `HuggingFaceH4/ultrachat_200k`).",
        max_length=200,
        pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*/[A-Za-z0-9][-A-Za-z0-9_.]*$",
    )
    revision: str | None = Field(
        default=None,
        description=(
            "Branch, tag or commit to read; unset means `main`. It is resolved to a commit "
            "once per version of the Dataset, so every worker pod reads the same files."
        ),
        max_length=256,
        pattern=r"^[^\s]+$",
    )
    endpoint: str | None = Field(
        default=None,
        description="URL of a Hub mirror (as `HF_ENDPOINT`); unset means the Hugging Face Hub.",
        max_length=2048,
        pattern=r"^https?://[^\s]+$",
    )
    credentials_secret: LocalObjectReference | None = Field(
        default=None,
        description=(
            "Secret holding `HF_TOKEN`, for gated or private datasets; referenced, never "
            "copied. Unset means anonymous access."
        ),
    )


# -- language models: pseudo-labelling and augmentation ----------------------------------------

TEXT_PLACEHOLDER = "{text}"
QUESTION_PLACEHOLDER = "{question}"
PromptTemplate = Annotated[str, StringConstraints(min_length=1, max_length=8192)]
DEFAULT_PARAPHRASE_TEMPLATE = (
    "Rewrite the following text in different words, keeping its meaning. Answer with the "
    "rewritten text only.\n\n{text}"
)
DEFAULT_QUESTION_TEMPLATE = (
    "Write one question that the following text answers. Answer with the question only.\n\n{text}"
)
DEFAULT_ANSWER_TEMPLATE = (
    "Answer the question using the text.\n\nText:\n{text}\n\nQuestion: {question}\n\nAnswer:"
)
DEFAULT_PSEUDO_LABEL_TEMPLATE = "{text}"


class LlmEndpoint(ApiModel):
    """An OpenAI-compatible API: a ModelDeployment of this namespace or any URL, and how
    hard to use it. Requests are cached by content hash on the Dataset's output volume, so a
    rerun or a retried slice sends nothing it already sent."""

    cel_rules = (
        Rule(
            cel=cel_exactly_one("modelDeployment", "url"),
            message="exactly one of modelDeployment or url must be set",
            check=lambda s: exactly_one(s, "model_deployment", "url"),
        ),
        Rule(
            cel="has(self.modelDeployment) || has(self.model)",
            message="model (the served model name) is needed with url",
            check=lambda s: s.model_deployment is not None or s.model is not None,
            field_path=".model",
        ),
    )

    model_deployment: LocalObjectReference | None = Field(
        default=None,
        description=(
            "A ModelDeployment of this namespace: its Service "
            "(`http://<name>.<namespace>.svc:<server.port>/v1`), its served model name and, "
            "without apiKeySecret, its `server.authTokenSecret` as the key. The Dataset waits "
            "while it does not exist."
        ),
    )
    url: Url | None = Field(
        default=None,
        description=(
            "Base URL of an OpenAI-compatible API, up to and including `/v1` (e.g. "
            "`https://api.openai.com/v1`); the requests go to `<url>/chat/completions` or "
            "`<url>/completions`."
        ),
    )
    api_key_secret: SecretKeySelector | None = Field(
        default=None,
        description=(
            "Secret key holding the API key, sent as a bearer token; referenced, never "
            "copied. Unset: none (with modelDeployment, its server.authTokenSecret)."
        ),
    )
    model: str | None = Field(
        default=None,
        description="Model name sent in the requests; unset: the ModelDeployment's served name.",
        min_length=1,
        max_length=256,
    )
    api: Literal["chat", "completions"] = Field(
        default="chat",
        description=(
            "`chat`: `/chat/completions` with the prompt as one user message (the model's chat "
            "template applies); `completions`: `/completions` with the prompt as it is."
        ),
    )
    concurrency: int = Field(
        default=4, description="Requests in flight at once, per worker pod.", ge=1, le=256
    )
    requests_per_second: float | None = Field(
        default=None,
        description="Most requests started per second, per worker pod; unset: no limit.",
        gt=0,
        le=10000,
    )
    max_retries: int = Field(
        default=5,
        description=(
            "Retries of a request answered 429 or 5xx (or not answered), with exponential "
            "backoff and jitter, honouring `Retry-After`; then the slice fails, naming the "
            "endpoint and the status code (the answers it got stay cached)."
        ),
        ge=0,
        le=20,
    )
    timeout_seconds: float = Field(
        default=120.0, description="Time limit of one request.", gt=0, le=3600
    )


class Generation(ApiModel):
    """Sampling settings of generated text."""

    temperature: float = Field(default=0.7, description="Sampling temperature.", ge=0, le=2)
    max_tokens: int = Field(
        default=256, description="Most tokens generated per answer.", ge=1, le=32768
    )


class Paraphrases(Generation):
    """Paraphrases of the training documents (a pair's prompt; the response stays)."""

    cel_rules = (
        Rule(
            cel=f"self.promptTemplate.contains('{TEXT_PLACEHOLDER}')",
            message=f"promptTemplate must contain {TEXT_PLACEHOLDER}",
            check=lambda s: TEXT_PLACEHOLDER in s.prompt_template,
            field_path=".promptTemplate",
        ),
    )

    count: int = Field(default=1, description="Paraphrases per document.", ge=1, le=16)
    prompt_template: PromptTemplate = Field(
        default=DEFAULT_PARAPHRASE_TEMPLATE,
        description="The request; `{text}` is replaced by the document (a pair's prompt).",
    )


class QuestionAnswer(Generation):
    """Synthetic question/answer pairs about the training documents: a question from the
    document, then its answer from the document and the question (two requests)."""

    cel_rules = (
        Rule(
            cel=f"self.questionTemplate.contains('{TEXT_PLACEHOLDER}')",
            message=f"questionTemplate must contain {TEXT_PLACEHOLDER}",
            check=lambda s: TEXT_PLACEHOLDER in s.question_template,
            field_path=".questionTemplate",
        ),
        Rule(
            cel=f"self.answerTemplate.contains('{QUESTION_PLACEHOLDER}')",
            message=f"answerTemplate must contain {QUESTION_PLACEHOLDER}",
            check=lambda s: QUESTION_PLACEHOLDER in s.answer_template,
            field_path=".answerTemplate",
        ),
    )

    count: int = Field(default=1, description="Question/answer pairs per document.", ge=1, le=16)
    question_template: PromptTemplate = Field(
        default=DEFAULT_QUESTION_TEMPLATE,
        description="The request for questions; `{text}` is replaced by the document.",
    )
    answer_template: PromptTemplate = Field(
        default=DEFAULT_ANSWER_TEMPLATE,
        description=(
            "The request for an answer; `{text}` is replaced by the document, `{question}` "
            "by the question."
        ),
    )


class LlmAugmentation(ApiModel):
    """Synthetic supervised records from a language model, added to the training split."""

    cel_rules = (
        Rule(
            cel="has(self.paraphrases) || has(self.questionAnswer)",
            message="llm augmentation needs paraphrases or questionAnswer",
            check=lambda s: s.paraphrases is not None or s.question_answer is not None,
        ),
    )

    endpoint: LlmEndpoint = Field(description="The model that writes them.")
    paraphrases: Paraphrases | None = Field(
        default=None,
        description=(
            "Paraphrases of each document (plain text stays plain text; a pair keeps its "
            "response). Chats are not paraphrased."
        ),
    )
    question_answer: QuestionAnswer | None = Field(
        default=None,
        description=(
            "Question/answer pairs about each document (a pair: its prompt and response), "
            "written as prompt/response records (a plain-text Dataset becomes a mixed one)."
        ),
    )


class PseudoLabel(Generation):
    """Responses for a source of prompts, generated by a model and kept when it is confident."""

    cel_rules = (
        Rule(
            cel=f"self.promptTemplate.contains('{TEXT_PLACEHOLDER}')",
            message=f"promptTemplate must contain {TEXT_PLACEHOLDER}",
            check=lambda s: TEXT_PLACEHOLDER in s.prompt_template,
            field_path=".promptTemplate",
        ),
    )

    endpoint: LlmEndpoint = Field(description="The model that answers the prompts.")
    prompt_template: PromptTemplate = Field(
        default=DEFAULT_PSEUDO_LABEL_TEMPLATE,
        description="The request; `{text}` is replaced by the prompt. The prompt stays as read.",
    )
    min_mean_logprob: float = Field(
        default=-1.0,
        description=(
            "Keep a response only when the mean log-probability of its tokens (the endpoint's "
            "`logprobs`) is at least this; -1 keeps answers of perplexity up to e. Dropped "
            "prompts are counted as `low-confidence`."
        ),
        ge=-100,
        le=0,
    )
    temperature: float = Field(
        default=0.0, description="Sampling temperature (0: greedy).", ge=0, le=2
    )


class DataSource(ApiModel):
    """One input of the corpus: where it is, how it is encoded, and how much of it to mix in."""

    cel_rules = (
        Rule(
            cel=cel_exactly_one("path", "volume", "urls", "s3", "hf"),
            message="exactly one of path, volume, urls, s3 or hf must be set",
            check=lambda s: exactly_one(s, "path", "volume", "urls", "s3", "hf"),
        ),
        Rule(
            cel="!has(self.pseudoLabel) || (!has(self.promptField) && !has(self.messagesField))",
            message="pseudoLabel reads prompts from textField (or plain text): no promptField, "
            "responseField or messagesField",
            check=lambda s: (
                s.pseudo_label is None or (s.prompt_field is None and s.messages_field is None)
            ),
            field_path=".pseudoLabel",
        ),
        Rule(
            cel="has(self.promptField) == has(self.responseField)",
            message="promptField and responseField must be set together",
            check=lambda s: (s.prompt_field is None) == (s.response_field is None),
            field_path=".promptField",
        ),
        Rule(
            cel="!has(self.messagesField) || (!has(self.promptField) && self.format != 'text')",
            message="messagesField (chat records) needs format jsonl or parquet and no promptField",
            check=lambda s: (
                s.messages_field is None or (s.prompt_field is None and s.format != "text")
            ),
            field_path=".messagesField",
        ),
        Rule(
            cel="!has(self.promptField) || self.format != 'text'",
            message="prompt/response fields need format jsonl or parquet",
            check=lambda s: s.prompt_field is None or s.format != "text",
            field_path=".format",
        ),
        Rule(
            cel=(
                "!has(self.urls) || ((!has(self.include) || size(self.include) == 0) && "
                "(!has(self.exclude) || size(self.exclude) == 0))"
            ),
            message="include and exclude select files of a path, volume, s3 or hf source, not urls",
            check=lambda s: s.urls is None or not (s.include or s.exclude),
            field_path=".include",
        ),
    )

    name: Name = Field(description="Name of the source, unique in the Dataset (used in stats).")
    path: Path | None = Field(
        default=None,
        description=(
            "A file or folder inside the preprocessing image; a relative path starts at the "
            "image's working folder (the repository root for `llmops run`). `$(VAR)` is "
            "replaced by the container's environment variable VAR, as Kubernetes does in "
            "args (`$$` for a literal `$`); `$(PYTHON_STDLIB)` is the folder of the Python "
            "standard library of the image, text that is on every machine with Python."
        ),
    )
    volume: VolumeSource | None = Field(
        default=None, description="Files on an existing PersistentVolumeClaim."
    )
    urls: list[Url] | None = Field(
        default=None,
        description="HTTP(S) URLs of files to download.",
        min_length=1,
        max_length=MAX_URLS,
    )
    s3: S3Location | None = Field(
        default=None, description="All objects under a prefix of an S3-compatible bucket."
    )
    hf: HubDatasetSource | None = Field(
        default=None,
        description=(
            "The data files of a dataset repository on the Hugging Face Hub (what "
            "`datasets.Dataset.push_to_hub` uploads), read as `format` says."
        ),
    )
    include: list[GlobPattern] = Field(
        default_factory=list,
        description=(
            "Keep only files whose path (relative to the folder, the S3 prefix or the Hub "
            "repository) matches one of these glob patterns; `*` stays inside a folder, `**` "
            "spans folders. Empty keeps every file, except in a Hub repository its README, "
            "licence, scripts and dot files, which only a pattern here selects."
        ),
        max_length=64,
    )
    exclude: list[GlobPattern] = Field(
        default_factory=list,
        description="Drop files whose relative path matches one of these glob patterns.",
        max_length=64,
    )
    format: SourceFormat = Field(
        default="text",
        description=(
            "`text`: plain text files, one document per file (blank-line separated documents "
            "with `documentSeparator`); `jsonl`: one JSON object per line; `parquet`: a table."
        ),
    )
    text_field: str = Field(
        default="text",
        description="Field holding the document text (jsonl and parquet).",
        max_length=128,
        pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$",
    )
    prompt_field: str | None = Field(
        default=None,
        description="Field holding the prompt of a supervised pair; with responseField.",
        max_length=128,
        pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$",
    )
    response_field: str | None = Field(
        default=None,
        description="Field holding the response of a supervised pair; with promptField.",
        max_length=128,
        pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$",
    )
    messages_field: str | None = Field(
        default=None,
        description=(
            "Field holding a chat: a list of `{role, content}` messages (system, user, "
            "assistant; multi-turn), rendered with the tokenizer's chat template "
            "(tokenizer.fromModel); the loss covers assistant turns only."
        ),
        max_length=128,
        pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$",
    )
    document_separator: Literal["file", "blank-line", "line"] = Field(
        default="blank-line",
        description="How plain text splits into documents: per file, per blank line, per line.",
    )
    weight: float = Field(
        default=1.0,
        description=(
            "Sampling weight in the training split: each training document of the source is "
            "written floor(weight) times, plus once more when a hash of its content falls "
            "below the fraction (so 2.5 repeats every document twice and half of them a "
            "third time, 0.3 keeps about 30% of them; reruns agree). Validation and test "
            "splits are not weighted. Plain-text and supervised sources mix this way too."
        ),
        gt=0,
        le=1000,
    )
    pseudo_label: PseudoLabel | None = Field(
        default=None,
        description=(
            "The documents are prompts without responses: a model answers each (after the "
            "cleaning steps), and the pair is kept when the answer's mean token "
            "log-probability reaches minMeanLogprob. The pairs are supervised records, marked "
            "synthetic in the statistics and the dataset card."
        ),
    )
    split: SplitName | None = Field(
        default=None,
        description=(
            "Put every document of this source in one split, e.g. `test` to hold a whole "
            "source out as the test set (then spec.split.test must be 0: the held-out sources "
            "are the whole test split). Unset: spec.split divides the source by its ratios."
        ),
    )

    @property
    def supervised(self) -> bool:
        """Prompt/response pairs (pseudo-labelled ones too) or chats: the loss covers the
        responses only."""
        return (
            self.prompt_field is not None
            or self.messages_field is not None
            or self.pseudo_label is not None
        )


class Normalization(ApiModel):
    """Text normalization, applied first."""

    unicode: Literal["NFC", "NFKC", "none"] = Field(
        default="NFKC",
        description=(
            "Unicode normalization form: `NFKC` also folds compatibility characters (the "
            "ligature U+FB01 becomes `fi`, the full-width U+FF21 becomes `A`), `NFC` only "
            "composes characters (e + U+0301 becomes U+00E9), `none` keeps them as read."
        ),
    )
    lowercase: bool = Field(default=False, description="Lowercase every document.")
    collapse_whitespace: bool = Field(
        default=True,
        description=(
            "Collapse each run of spaces and tabs (Unicode spaces too) to one space, drop the "
            "space at a line's start and end and cut longer runs of blank lines to one; "
            "false keeps spaces, tabs and blank lines as read (either way CRLF line ends "
            "become LF and the document's leading and trailing whitespace is stripped)."
        ),
    )


class NearDuplicates(ApiModel):
    """MinHash LSH near-duplicate removal."""

    cel_rules = (
        Rule(
            cel="self.numPermutations % self.bands == 0",
            message="numPermutations must be a multiple of bands (rows per band = their ratio)",
            check=lambda s: s.num_permutations % s.bands == 0,
            field_path=".bands",
        ),
    )

    enabled: bool = Field(default=True, description="Remove near-duplicate documents.")
    num_permutations: int = Field(
        default=128, description="MinHash signature length.", ge=16, le=1024
    )
    bands: int = Field(
        default=16, description="LSH bands (signature split into bands).", ge=1, le=1024
    )
    shingle_size: int = Field(default=5, description="Words per shingle.", ge=1, le=32)
    threshold: float = Field(
        default=0.8,
        description="Estimated Jaccard similarity above which two documents are duplicates.",
        gt=0,
        le=1,
    )


class Deduplication(ApiModel):
    """Duplicate removal: exact (content hash), then near-duplicate (MinHash)."""

    exact: bool = Field(
        default=True,
        description=(
            "Remove documents with identical content (after normalization). Off, identical "
            "copies are still near duplicates (similarity 1): switch near off too to keep them."
        ),
    )
    near: NearDuplicates = nested(NearDuplicates, "Near-duplicate removal with MinHash LSH.")


class QualityFilters(ApiModel):
    """Heuristic quality filters (Gopher/C4 style); a document failing any is dropped."""

    cel_rules = (
        Rule(
            cel="!has(self.maxWords) || self.minWords <= self.maxWords",
            message="minWords must not exceed maxWords",
            check=lambda s: s.max_words is None or s.min_words <= s.max_words,
            field_path=".minWords",
        ),
    )

    min_words: int = Field(
        default=5, description="Fewest words a document may have.", ge=0, le=1_000_000
    )
    max_words: int | None = Field(
        default=None,
        description="Most words a document may have; unset means no limit.",
        ge=1,
        le=1_000_000_000,
    )
    max_symbol_ratio: float = Field(
        default=0.3, description="Largest share of non-alphanumeric characters.", ge=0, le=1
    )
    min_alpha_word_ratio: float = Field(
        default=0.6, description="Smallest share of words with at least one letter.", ge=0, le=1
    )
    max_duplicate_line_ratio: float = Field(
        default=0.3, description="Largest share of lines repeated inside the document.", ge=0, le=1
    )
    min_stop_words: int = Field(
        default=2,
        description=(
            "Fewest distinct English stop words (the, of, and, ...) an English document needs; "
            "0 switches the rule off (code, tables, other languages)."
        ),
        ge=0,
        le=8,
    )
    quality: bool = Field(
        default=True,
        description=(
            "Apply the Gopher quality rules (word count and length, symbols, bullets, stop "
            "words); false keeps every document whatever it looks like."
        ),
    )
    repetition: bool = Field(
        default=True,
        description=(
            "Apply the Gopher repetition rules (repeated lines, paragraphs and n-grams); "
            "switch off for source code, where repeated lines are normal."
        ),
    )
    c4_lines: bool = Field(
        default=False,
        description=(
            "Apply the C4 line rules (Raffel et al. 2020, datatrove's C4QualityFilter), "
            "meant for web pages: remove citation marks ([1], [edit]) and every line that "
            "does not end in terminal punctuation (. ! ? or a closing quote), has fewer than "
            "3 words or a word over 1000 characters, or mentions javascript or a cookie, "
            "privacy or terms-of-use policy; then drop the document if it contains `lorem "
            "ipsum` or a curly bracket, or keeps fewer than 5 sentences. Kept documents keep "
            "only their kept lines. Off by default: it drops most code and documentation. "
            "Counted in the statistics under step filter-lines (documents dropped per rule, "
            "linesRemoved per rule); supervised records are left alone."
        ),
    )


class LanguageFilter(ApiModel):
    """Keep documents in the listed languages."""

    allow: Annotated[list[LanguageCode], AfterValidator(distinct)] = Field(
        default_factory=list,
        description="ISO 639-1 codes to keep (e.g. `en`); empty keeps every language.",
        max_length=64,
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    min_confidence: float = Field(
        default=0.5, description="Smallest detector confidence to accept a language.", ge=0, le=1
    )


AugmentationMethod = Literal["word-dropout", "word-swap", "sentence-shuffle"]
PiiKind = Literal["email", "phone", "ip-address", "credit-card"]
DEFAULT_PII: tuple[PiiKind, ...] = ("email", "phone", "ip-address")


class PiiScrubbing(ApiModel):
    """Replace personal data with placeholder tokens."""

    enabled: bool = Field(
        default=True,
        description=(
            "Replace personal data with placeholders (`<EMAIL>`, `<PHONE>`, `<IP_ADDRESS>`, "
            "`<CREDIT_CARD>`); false keeps the text as it is."
        ),
    )
    kinds: Annotated[list[PiiKind], AfterValidator(distinct)] = Field(
        default_factory=lambda: list(DEFAULT_PII),
        description="What to scrub.",
        max_length=4,
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )


class Augmentation(ApiModel):
    """Extra noisy copies of documents (robustness for small corpora)."""

    cel_rules = (
        Rule(
            cel="!self.enabled || size(self.methods) > 0",
            message="augmentation needs at least one method when enabled",
            check=lambda s: not s.enabled or len(s.methods) > 0,
            field_path=".methods",
        ),
    )

    enabled: bool = Field(
        default=False,
        description=(
            "Add augmented copies of the training split's documents (validation and test "
            "stay clean; with pairs and chats only the prompts and user turns are perturbed)."
        ),
    )
    methods: Annotated[list[AugmentationMethod], AfterValidator(distinct)] = Field(
        default_factory=list,
        description="Perturbations applied to each copy.",
        max_length=3,
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    copies: int = Field(default=1, description="Augmented copies per document.", ge=1, le=10)
    probability: float = Field(
        default=0.1, description="Per-word (or per-sentence) perturbation probability.", ge=0, le=1
    )
    llm: LlmAugmentation | None = Field(
        default=None,
        description=(
            "Paraphrases and question/answer pairs written by a language model for the "
            "training split's documents (independent of `enabled`, which switches the cheap "
            "methods). Generated records are marked synthetic in the statistics and the card."
        ),
    )


class Decontamination(ApiModel):
    """Drop training documents that share an n-gram with evaluation text."""

    cel_rules = (
        Rule(
            cel="(has(self.against) && size(self.against) > 0) || "
            "(has(self.files) && size(self.files) > 0)",
            message="decontamination needs evaluation text: against (validation, test) or files",
            check=lambda s: bool(s.against or s.files),
        ),
    )

    ngram: int = Field(
        default=13,
        description=(
            "Words per n-gram. Words are the runs of letters and digits, lower-cased (case, "
            "punctuation and spacing do not matter); a training document sharing one n-gram "
            "with the evaluation text is dropped (13, as GPT-3's decontamination). An "
            "evaluation text shorter than this has no n-gram and matches nothing."
        ),
        ge=5,
        le=64,
    )
    against: Annotated[list[EvaluationSplit], AfterValidator(distinct)] = Field(
        default_factory=lambda: list(EVALUATION_SPLITS),
        description=(
            "Splits of this Dataset whose documents (after cleaning and splitting, held-out "
            "sources too) are evaluation text."
        ),
        max_length=2,
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    files: list[Path] = Field(
        default_factory=list,
        description=(
            "Evaluation sets read by the prepare pod: files or folders inside the preprocessing "
            "image (a relative path starts at the image's working folder; `$(VAR)` expands "
            "as in sources[].path). A `.jsonl` file gives one text per string value of each "
            "record (question, choices and answer alike); any other file is plain text, one "
            "text per blank-line separated paragraph. Their content is part of the Dataset's "
            "fingerprint."
        ),
        max_length=64,
    )


class Processing(ApiModel):
    """The cleaning pipeline, in order: normalize, deduplicate, filter, language, PII, augment."""

    normalization: Normalization = nested(Normalization, "Text normalization.")
    deduplication: Deduplication = nested(Deduplication, "Exact and near-duplicate removal.")
    filters: QualityFilters = nested(QualityFilters, "Heuristic quality filters.")
    languages: LanguageFilter = nested(LanguageFilter, "Language allow-list.")
    pii: PiiScrubbing = nested(PiiScrubbing, "Personal data scrubbing.")
    augmentation: Augmentation = nested(Augmentation, "Optional data augmentation.")
    decontamination: Decontamination | None = Field(
        default=None,
        description=(
            "Drop training documents that share an n-gram of words with the validation or "
            "test split or with evaluation files (in the tokenize pods, after splitting; "
            "counted under step decontaminate, per source and in the dataset card). Unset: off."
        ),
    )


DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")
SPECIAL_TOKENS_DESCRIPTION = "Special tokens added to the vocabulary (end of text first)."


class TokenizerTraining(ApiModel):
    """Train a byte-level BPE tokenizer on the training split (a deterministic sample of it,
    up to about 256 MiB, when it is larger)."""

    vocab_size: int = Field(default=8192, description="Vocabulary size.", ge=256, le=1048576)
    min_frequency: int = Field(
        default=2, description="Fewest occurrences for a merge.", ge=1, le=1000000
    )
    special_tokens: list[SpecialToken] = Field(
        default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS),
        description=SPECIAL_TOKENS_DESCRIPTION,
        max_length=64,
    )


class ByteTokenizer(ApiModel):
    """One token per byte: ids 0-255 are the UTF-8 bytes of the text, the special tokens
    follow (256, 257, ...). Nothing is trained and every text decodes back exactly."""

    special_tokens: list[SpecialToken] = Field(
        default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS),
        description=SPECIAL_TOKENS_DESCRIPTION,
        min_length=1,
        max_length=64,
    )


class CharTokenizer(ApiModel):
    """One token per character of the training split, numbered in code point order (as
    nanoGPT's shakespeare_char numbers them), then the fallback, then the special tokens."""

    special_tokens: list[SpecialToken] = Field(
        default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS),
        description=SPECIAL_TOKENS_DESCRIPTION,
        min_length=1,
        max_length=64,
    )
    min_frequency: int = Field(
        default=1,
        description=(
            "Fewest occurrences in the training split for a character to get its own token; "
            "rarer characters are encoded with the fallback."
        ),
        ge=1,
        le=1000000,
    )
    fallback: Literal["unknown-token", "bytes"] = Field(
        default="unknown-token",
        description=(
            "How a character without a token (unseen in the training split, e.g. only in a "
            "held-out source, or rarer than minFrequency) is encoded: `unknown-token`: as "
            "one `<|unk|>` token, which decodes to the text `<|unk|>` (one more token in the "
            "vocabulary); `bytes`: as the tokens of its UTF-8 bytes (`<0x00>`..`<0xFF>`, 256 "
            "more tokens), so that every text decodes back exactly."
        ),
    )


class Tokenizer(ApiModel):
    """Which tokenizer to use: exactly one of train, byte, char, path, datasetRef or
    fromModel."""

    cel_rules = (
        Rule(
            cel=cel_exactly_one("train", "byte", "char", "path", "datasetRef", "fromModel"),
            message="exactly one of train, byte, char, path, datasetRef or fromModel must be set",
            check=lambda s: exactly_one(
                s, "train", "byte", "char", "path", "dataset_ref", "from_model"
            ),
        ),
    )

    train: TokenizerTraining | None = Field(
        default=None, description="Train a new byte-level BPE tokenizer on this data."
    )
    byte: ByteTokenizer | None = Field(
        default=None,
        description=(
            "Bytes as tokens (256 plus the special tokens), nothing trained: small corpora, "
            "teaching, byte-level baselines. `{}` takes the defaults."
        ),
    )
    char: CharTokenizer | None = Field(
        default=None,
        description=(
            "Characters as tokens: the characters of the training split, the special tokens "
            "and a fallback for unseen characters (as nanoGPT's shakespeare_char). `{}` takes "
            "the defaults."
        ),
    )
    path: Path | None = Field(
        default=None, description="A `tokenizer.json` file inside the preprocessing image."
    )
    dataset_ref: LocalObjectReference | None = Field(
        default=None, description="Reuse the tokenizer of another (succeeded) Dataset."
    )
    from_model: PretrainedModel | None = Field(
        default=None,
        description=(
            "Use the tokenizer (and chat template) of an open-weights model, the one a "
            "TrainingRun will fine-tune; only its tokenizer files are fetched."
        ),
    )


class Split(ApiModel):
    """Train/validation/test split by document."""

    cel_rules = (
        Rule(
            cel="self.train + self.validation + self.test > 0.999 && "
            "self.train + self.validation + self.test < 1.001",
            message="train, validation and test ratios must sum to 1",
            check=lambda s: abs(s.train + s.validation + s.test - 1) < 0.001,
        ),
    )

    mode: Literal["hash", "contiguous"] = Field(
        default="hash",
        description=(
            "How documents are divided by the ratios. `hash`: by a seeded hash of each "
            "document's content (a document keeps its split when others are added or "
            "removed). `contiguous`: by position in the stream (sources in spec order, their "
            "files sorted by path, URLs as listed, documents in file order): the first `train` "
            "share of the kept documents (rounded) trains, the next `validation` share "
            "validates, the rest tests, as nanoGPT's prepare scripts cut a text; the same for "
            "any number of slices. Either way a split with a share above zero gets at least "
            "one document when training keeps one."
        ),
    )
    train: float = Field(
        default=0.98,
        description="Share for training (of the sources without a split of their own).",
        gt=0,
        le=1,
    )
    validation: float = Field(
        default=0.01,
        description=(
            "Share for validation (of the sources without a split of their own); 0 when a "
            "source is held out as the validation set."
        ),
        ge=0,
        lt=1,
    )
    test: float = Field(
        default=0.01,
        description=(
            "Share for the final test (of the sources without a split of their own); 0 when "
            "a source is held out as the test set."
        ),
        ge=0,
        lt=1,
    )
    seed: int = Field(
        default=1234, description="Seed of the split (mode hash).", ge=0, le=4294967295
    )


class Sharding(ApiModel):
    """How token files are cut."""

    tokens_per_shard: int = Field(
        default=100_000_000, description="Tokens per shard file.", ge=1024, le=10_000_000_000
    )
    token_dtype: Literal["auto", "uint16", "uint32"] = Field(
        default="auto",
        description=(
            "Integer type of stored tokens; `auto` picks uint16 for vocabularies up to 65536."
        ),
    )


class DatasetSpec(ApiModel):
    """Desired state of a Dataset."""

    cel_rules = (
        Rule(
            cel="!self.sources.exists(s, has(s.messagesField)) || has(self.tokenizer.fromModel)",
            message="chat sources (messagesField) need tokenizer.fromModel, whose chat template "
            "renders them",
            check=lambda s: (
                not any(x.messages_field for x in s.sources) or s.tokenizer.from_model is not None
            ),
            field_path=".tokenizer",
        ),
        Rule(
            cel="self.sharding.tokenDtype != 'uint16' || !has(self.tokenizer.train) || "
            "self.tokenizer.train.vocabSize <= 65536",
            message="tokenDtype uint16 holds at most 65536 token ids; use uint32 or auto",
            check=lambda s: (
                s.sharding.token_dtype != "uint16"
                or s.tokenizer.train is None
                or s.tokenizer.train.vocab_size <= 65536
            ),
            field_path=".sharding.tokenDtype",
        ),
        Rule(
            cel="self.sources.exists(s, !has(s.split) || s.split == 'train')",
            message="at least one source must feed the training split: sources[].split holds "
            "every source out",
            check=lambda s: any(x.split in (None, "train") for x in s.sources),
            field_path=".sources",
        ),
        Rule(
            cel="!self.sources.exists(s, has(s.split) && s.split == 'validation') || "
            "self.split.validation == 0.0",
            message="a source held out as the validation set (sources[].split: validation) is "
            "the whole validation split: set split.validation to 0 (and the other ratios to "
            "sum to 1)",
            check=lambda s: (
                all(x.split != "validation" for x in s.sources) or s.split.validation == 0
            ),
            field_path=".split.validation",
        ),
        Rule(
            cel="!self.sources.exists(s, has(s.split) && s.split == 'test') || "
            "self.split.test == 0.0",
            message="a source held out as the test set (sources[].split: test) is the whole "
            "test split: set split.test to 0 (and the other ratios to sum to 1)",
            check=lambda s: all(x.split != "test" for x in s.sources) or s.split.test == 0,
            field_path=".split.test",
        ),
    )

    sources: list[DataSource] = Field(
        description=(
            "Inputs of the corpus, mixed by weight. Plain-text and supervised sources "
            "(promptField or messagesField) may be mixed: objective sft then trains plain "
            "text on every token and supervised records on their responses only."
        ),
        min_length=1,
        max_length=MAX_SOURCES,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    processing: Processing = nested(Processing, "The cleaning pipeline.")
    tokenizer: Tokenizer = Field(description="Tokenizer to build, train or reuse.")
    split: Split = nested(Split, "Train/validation/test split.")
    sharding: Sharding = nested(Sharding, "Token shard files.")
    output: Storage | None = Field(
        default=None,
        description=(
            "Where shards, tokenizer and stats go; unset means a new 10Gi claim "
            "`<name>-data` with the default StorageClass."
        ),
    )
    parallelism: int = Field(
        default=1, description="Worker pods processing sources in parallel.", ge=1, le=256
    )
    slice_bytes: int = Field(
        default=64 * 2**20,
        description=(
            "Largest piece of one input a worker pod reads: an uncompressed text or jsonl "
            "input larger than this is cut into byte ranges at line ends (a parquet input "
            "into groups of row groups), so one big file spreads over the worker pods; "
            "compressed inputs stay whole. The output does not depend on it."
        ),
        ge=2**20,
        le=2**40,
    )
    resources: Resources = nested(Resources, "Compute for each worker pod.")
    scheduling: Scheduling = nested(Scheduling, "Placement and priority of the worker pods.")
    retain_policy: Literal["Retain", "Delete"] = Field(
        default="Retain",
        description=(
            "What happens to an output claim the operator created when the Dataset is deleted: "
            "`Retain` keeps it (and the data) for later use, `Delete` removes it with the Dataset."
        ),
    )

    def llm_endpoints(self) -> list[tuple[str, LlmEndpoint]]:
        """Every language model the Dataset asks, as (what for, endpoint), in a fixed order:
        the position is the endpoint's number in the workload's environment
        (`workload.llm_endpoint_env`)."""
        found = [
            (f"spec.sources[{s.name}].pseudoLabel.endpoint", s.pseudo_label.endpoint)
            for s in self.sources
            if s.pseudo_label is not None
        ]
        if self.processing.augmentation.llm is not None:
            found.append(
                (
                    "spec.processing.augmentation.llm.endpoint",
                    self.processing.augmentation.llm.endpoint,
                )
            )
        return found

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[DataSource]) -> list[DataSource]:
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        return sources


DATA_STAGES = ("slice", "dedup", "prepare", "tokenize", "finalize")  # a version's Jobs, in order


def dedup_groups(spec: DatasetSpec) -> int:
    """Pods of the dedup stage: one per group of LSH bands (at most `parallelism`, at most
    one per band), which also share the exact-duplicate hashes. The output does not depend
    on it."""
    near = spec.processing.deduplication.near
    return max(1, min(spec.parallelism, near.bands)) if near.enabled else spec.parallelism


class StageProgress(StatusModel):
    """One stage of a version's processing: its Job and how far its pods got."""

    name: Literal["slice", "dedup", "prepare", "tokenize", "finalize"] = Field(
        description=(
            "slice (per slice), dedup (per group of LSH bands), prepare (clusters, splits, "
            "tokenizer), tokenize (per unit of text, shards) or finalize (manifest, card)."
        )
    )
    job: str = Field(default="", description="The stage's Job.")
    completions: int = Field(default=0, description="Pods the stage needs to succeed.", ge=0)
    succeeded: int = Field(default=0, description="Pods that succeeded.", ge=0)
    failed: int = Field(default=0, description="Pod failures so far (retried ones too).", ge=0)
    state: Literal["Pending", "Running", "Complete", "Failed"] = Field(
        default="Pending", description="Pending until its Job exists, then its outcome."
    )


class StepStats(StatusModel):
    """Documents in and out of one pipeline step."""

    name: str = Field(description="Step name (normalize, dedup-exact, dedup-near, filter, ...).")
    documents_in: int = Field(default=0, description="Documents entering the step.", ge=0)
    documents_out: int = Field(default=0, description="Documents leaving the step.", ge=0)


class TokenCounts(StatusModel):
    """Tokens per split."""

    train: int = Field(default=0, description="Tokens in the training split.", ge=0)
    validation: int = Field(default=0, description="Tokens in the validation split.", ge=0)
    test: int = Field(default=0, description="Tokens in the test split.", ge=0)


class DatasetStatus(StatusModel):
    """Observed state of a Dataset."""

    phase: Literal["Pending", "Running", "Succeeded", "Failed"] | None = Field(
        default=None, description="Coarse lifecycle phase."
    )
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation last acted on.", ge=0
    )
    conditions: list[Condition] = conditions_field()
    stage: str | None = Field(
        default=None,
        description=(
            "The stage of the current version running now (slice, dedup, prepare, tokenize, "
            "finalize)."
        ),
    )
    stages: list[StageProgress] = Field(
        default_factory=list,
        description="Per-stage progress of the current version, in order.",
        max_length=8,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    steps: list[StepStats] = Field(
        default_factory=list,
        description="Per-step document counts, in pipeline order.",
        max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    documents: int | None = Field(default=None, description="Documents in the final corpus.", ge=0)
    tokens: TokenCounts | None = Field(default=None, description="Tokens per split.")
    total_tokens: int | None = Field(default=None, description="Tokens over all splits.", ge=0)
    exact_duplicate_ratio: float | None = Field(
        default=None, description="Share of documents removed as exact duplicates.", ge=0, le=1
    )
    near_duplicate_ratio: float | None = Field(
        default=None, description="Share of documents removed as near duplicates.", ge=0, le=1
    )
    languages: dict[str, float] = Field(
        default_factory=dict, description="Share of kept documents per detected language."
    )
    vocab_size: int | None = Field(default=None, description="Vocabulary size of the tokenizer.")
    synthetic_documents: int | None = Field(
        default=None,
        description=(
            "Documents of the output written by a language model (pseudo-labelled pairs, "
            "paraphrases, question/answer pairs), training copies included."
        ),
        ge=0,
    )
    output_uri: str | None = Field(
        default=None, description="Where the shards are (`pvc://claim/path` or `s3://...`)."
    )
    tokenizer_uri: str | None = Field(default=None, description="Where `tokenizer.json` is.")
    fingerprint: str | None = Field(
        default=None,
        description=(
            "sha256 of the inputs and the processing config: the version of the data a run used."
        ),
    )
    start_time: datetime | None = Field(default=None, description="When processing started.")
    completion_time: datetime | None = Field(default=None, description="When processing ended.")


class Dataset(ApiModel):
    """A Dataset custom resource."""

    cel_rules = (
        Rule(
            cel="!has(self.spec.tokenizer.datasetRef) || "
            "self.spec.tokenizer.datasetRef.name != self.metadata.name",
            message="a Dataset cannot reuse its own tokenizer",
            check=lambda d: (
                d.spec.tokenizer.dataset_ref is None
                or d.spec.tokenizer.dataset_ref.name != d.metadata.name
            ),
            field_path=".spec.tokenizer.datasetRef.name",
        ),
    )

    api_version: Literal["llmops.dev/v1alpha1"] = Field(description="API version.")
    kind: Literal["Dataset"] = Field(description="Kind.")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: DatasetSpec = Field(description="Desired state.")
    status: DatasetStatus = Field(default_factory=DatasetStatus, description="Observed state.")
