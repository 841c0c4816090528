"""What a JSON-schema constraint costs per token on this machine, for each
installed constraint library (llguidance, xgrammar, outlines-core), on the
default model's vocabulary, against the model's own one-token forward.

    python examples/grammar_cost.py [--model M] [--libs llguidance,xgrammar,outlines_core]
                                    [--passes 3] [--draft 6] [--decode 3] [--no-probe]

For each schema it compiles the grammar (schema -> ready matcher, what a
request pays), then walks the tokens of a valid instance (json.dumps of an
example, tokenized by the model's tokenizer) and times at every position the
next-token mask (into an int32 bitmask), the advance by the instance's token,
the forced tokens the grammar offers there (and whether they are the
instance's next tokens: free drafts that would be right), a rollback of 4
tokens, the check of a draft (the instance's next --draft tokens, plus one
wrong token where the draft is long enough) and the masks at every position of
that draft (what exact speculative verification needs). Per-token figures are
the minimum over --passes fresh matchers at each position, then the mean and
95th percentile over positions, so that other processes on a shared machine
inflate them less. The bitmask -> additive -inf conversion in MLX is timed
separately, and the model's one-token forward (300 cached tokens) in the same
run gives each cost as a share of a decoding step.

--decode N runs greedy constrained decoding of the model with mlx-lm's
generate_step and a logits processor built from each library, for the first N
decode schemas, and validates the output with jsonschema. The probe lists the
schema features each library refuses, with its message (what a server must
answer with a 400). Figures and the choice: docs/structured_output.md.
"""

import mlx_mtp  # noqa: F401, I001  (first: it loads a fast BLAS before MLX on Linux)

import argparse
import importlib.metadata
import importlib.util
import json
import statistics
import time

import mlx.core as mx
import numpy as np

from mlx_mtp.default_model import ensure_default_model

# (name, schema, a valid instance) over the features apps ask for: nested
# objects, arrays, enums, numbers with bounds, optional fields, patterns,
# formats, unions, recursion, and the bare json_object mode.
SCHEMAS = [
    (
        "flat",
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
        },
        {"name": "Ada Lovelace", "age": 36},
    ),
    (
        "enum_bool_num",
        {
            "type": "object",
            "properties": {
                "status": {"enum": ["active", "inactive", "pending"]},
                "verified": {"type": "boolean"},
                "score": {"type": "number"},
            },
            "required": ["status", "verified", "score"],
        },
        {"status": "pending", "verified": True, "score": 0.875},
    ),
    (
        "nested",
        {
            "type": "object",
            "properties": {
                "user": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer"},
                        "email": {"type": "string"},
                        "address": {
                            "type": "object",
                            "properties": {
                                "street": {"type": "string"},
                                "city": {"type": "string"},
                                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                            },
                            "required": ["street", "city", "zip"],
                        },
                    },
                    "required": ["id", "email", "address"],
                }
            },
            "required": ["user"],
        },
        {
            "user": {
                "id": 7,
                "email": "ada@example.com",
                "address": {"street": "1 Main St", "city": "Paris", "zip": "75001"},
            }
        },
    ),
    (
        "array_objects",
        {
            "type": "object",
            "properties": {
                "items": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {
                            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                            "qty": {"type": "integer", "minimum": 1},
                            "price": {"type": "number"},
                        },
                        "required": ["sku", "qty", "price"],
                    },
                }
            },
            "required": ["items"],
        },
        {
            "items": [
                {"sku": "ABC-1234", "qty": 2, "price": 9.99},
                {"sku": "XYZ-0001", "qty": 1, "price": 120.5},
                {"sku": "QRS-4242", "qty": 12, "price": 0.25},
            ]
        },
    ),
    (
        "optional_fields",
        {
            "type": "object",
            "properties": {
                "title": {"type": "string"},
                "year": {"type": "integer"},
                "director": {"type": "string"},
                "rating": {"type": "number"},
                "genres": {"type": "array", "items": {"type": "string"}},
                "sequel": {"type": "boolean"},
            },
            "required": ["title", "year"],
        },
        {"title": "Metropolis", "year": 1927, "genres": ["drama", "science fiction"]},
    ),
    (
        "bounds_tags",
        {
            "type": "object",
            "properties": {
                "lat": {"type": "number", "minimum": -90, "maximum": 90},
                "lon": {"type": "number", "minimum": -180, "maximum": 180},
                "floor": {"type": "integer", "minimum": 0, "maximum": 200},
                "tags": {
                    "type": "array",
                    "items": {"enum": ["cafe", "museum", "park", "station"]},
                    "maxItems": 3,
                },
            },
            "required": ["lat", "lon", "floor", "tags"],
        },
        {"lat": 48.8566, "lon": 2.3522, "floor": 3, "tags": ["museum", "cafe"]},
    ),
    (
        "formats",
        {
            "type": "object",
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "created": {"type": "string", "format": "date-time"},
                "contact": {"type": "string", "format": "email"},
            },
            "required": ["id", "created", "contact"],
        },
        {"id": "123e4567-e89b-12d3-a456-426614174000", "created": "2024-05-01T12:30:00Z", "contact": "bob@example.org"},
    ),
    (
        "union_null",
        {
            "type": "object",
            "properties": {
                "result": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                "error": {"type": ["string", "null"]},
            },
            "required": ["result", "error"],
        },
        {"result": 404, "error": None},
    ),
    (
        "tool_call",
        {
            "type": "object",
            "properties": {
                "name": {"const": "get_weather"},
                "arguments": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string"},
                        "unit": {"enum": ["celsius", "fahrenheit"]},
                        "days": {"type": "integer", "minimum": 1, "maximum": 14},
                    },
                    "required": ["city", "unit"],
                },
            },
            "required": ["name", "arguments"],
        },
        {"name": "get_weather", "arguments": {"city": "Lyon", "unit": "celsius", "days": 3}},
    ),
    (
        "recursive",
        {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {
                        "label": {"type": "string"},
                        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                    },
                    "required": ["label", "children"],
                }
            },
            "$ref": "#/$defs/node",
        },
        {
            "label": "root",
            "children": [{"label": "a", "children": []}, {"label": "b", "children": [{"label": "c", "children": []}]}],
        },
    ),
    (
        "json_object",
        {"type": "object"},
        {"city": "Oslo", "population": 709000, "tags": ["capital", "port"], "coastal": True},
    ),
]

# schemas the greedy decoding check uses, with the request that goes with each
DECODE = [
    ("flat", "Give the name and age of a famous scientist."),
    ("tool_call", "Call the weather tool for Lyon in celsius for 3 days."),
    ("enum_bool_num", "Describe an account that is pending, not verified, with a score of 0.5."),
]

# schema features a library may refuse, enforce or silently ignore:
# (feature, schema, an instance that breaks it, an instance that fits it)
PROBES = [
    ("not", {"not": {"type": "string"}}, "abc", 3),
    ("if/then/else", {"if": {"type": "integer"}, "then": {"minimum": 0}, "else": {"type": "string"}}, -5, 5),
    (
        "patternProperties",
        {"type": "object", "patternProperties": {"^x-": {"type": "string"}}},
        {"x-a": 1},
        {"x-a": "b"},
    ),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 1], [1, 2]),
    ("lookahead pattern", {"type": "string", "pattern": "^(?=.*[0-9]).+$"}, "abc", "ab1"),
    ("multipleOf", {"type": "integer", "multipleOf": 5}, 7, 15),
    ("maxLength", {"type": "string", "maxLength": 3}, "abcd", "abc"),
    ("format email", {"type": "string", "format": "email"}, "abc", "a@b.io"),
    ("extra property", {"type": "object", "properties": {"a": {"type": "integer"}}}, {"a": "x"}, {"a": 1, "b": 2}),
    ("minimum", {"type": "integer", "minimum": 10}, 9, 10),
    ("dangling $ref", {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, None, None),
    ("bad type", {"type": "strin"}, None, None),
    (
        "deep recursion",
        SCHEMAS[9][1],
        None,
        {
            "label": "a",
            "children": [{"label": "b", "children": [{"label": "c", "children": [{"label": "d", "children": []}]}]}],
        },
    ),
    ("json_object", {"type": "object"}, [1], {"a": {"b": [1, {"c": None}]}}),
]


class Backend:
    """One library behind the operations speculative decoding needs; a
    matcher is whatever the library keeps per request."""

    name = ""

    def matcher(self, schema):
        raise NotImplementedError

    def mask_into(self, m, buf):
        raise NotImplementedError

    def advance(self, m, token) -> bool:
        raise NotImplementedError

    def rollback(self, m, k):
        raise NotImplementedError

    def validate(self, m, draft) -> int:
        """How many leading tokens of draft the grammar accepts; state unchanged."""
        raise NotImplementedError

    def forced(self, m) -> list:
        raise NotImplementedError

    def fits(self, m, ids, eos) -> bool:
        """Whether the grammar takes all of ids and then the end of sequence."""
        return all(self.advance(m, t) for t in ids) and self.advance(m, eos)

    def draft_masks(self, m, draft, bufs) -> int:
        """Masks at the current position and after each accepted draft token
        into bufs[0..]; state unchanged. Returns the accepted count."""
        n = self.validate(m, draft)  # never advance on an unchecked token: llguidance would stay in error
        self.mask_into(m, bufs[0:1])
        for i, t in enumerate(draft[:n]):
            self.advance(m, t)
            self.mask_into(m, bufs[i + 1 : i + 2])
        self.rollback(m, n)
        return n


class LLGuidance(Backend):
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size):
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.version = importlib.metadata.version("llguidance")

    def matcher(self, schema):
        M = self.llg.LLMatcher
        grammar = M.grammar_from_json_schema(schema, overrides={"whitespace_pattern": "[ ]?"})
        error = M.validate_grammar(grammar, self.tok)
        if error:
            raise ValueError(error)
        m = M(self.tok, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def mask_into(self, m, buf):
        m.unsafe_compute_mask_ptr(buf.ctypes.data, buf.nbytes)

    def advance(self, m, token):
        return m.consume_token(token)

    def rollback(self, m, k):
        m.rollback(k)

    def validate(self, m, draft):
        return m.validate_tokens(draft)

    def forced(self, m):
        return m.compute_ff_tokens()


class XGrammar(Backend):
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size):
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        # no cache: every schema is compiled as a new request would be
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.version = importlib.metadata.version("xgrammar")

    def matcher(self, schema):
        grammar = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=True, max_whitespace_cnt=1)
        return self.xgr.GrammarMatcher(grammar)

    def mask_into(self, m, buf):
        m.fill_next_token_bitmask(buf)

    def advance(self, m, token):
        return m.accept_token(token)

    def rollback(self, m, k):
        if k:
            m.rollback(k)

    def validate(self, m, draft):
        n = 0
        for t in draft:
            if not m.accept_token(t):
                break
            n += 1
        self.rollback(m, n)
        return n

    def forced(self, m):
        return m.find_jump_forward_tokens()


class OutlinesCore(Backend):
    name = "outlines_core"

    def __init__(self, tokenizer, vocab_size):
        import outlines_core

        self.oc = outlines_core
        self.vocab = outlines_core.Vocabulary(tokenizer.eos_token_id, byte_vocabulary(tokenizer))
        self.version = importlib.metadata.version("outlines_core")

    def matcher(self, schema):
        from outlines_core.json_schema import build_regex_from_schema

        regex = build_regex_from_schema(json.dumps(schema))
        return self.oc.Guide(self.oc.Index(regex, self.vocab), max_rollback=64)

    def mask_into(self, m, buf):
        m.write_mask_into(buf.ctypes.data, buf.size, buf.itemsize)

    def advance(self, m, token):
        try:
            m.advance(token, return_tokens=False)
        except ValueError:
            return False
        return True

    def rollback(self, m, k):
        if k:
            m.rollback_state(k)

    def validate(self, m, draft):
        # accepts_tokens answers for the whole draft only; the prefix needs advancing
        if m.accepts_tokens(list(draft)):
            return len(draft)
        n = 0
        for t in draft:
            if not self.advance(m, t):
                break
            n += 1
        self.rollback(m, n)
        return n

    def fits(self, m, ids, eos):
        # its final states list the end of sequence as allowed but do not advance on it
        return all(self.advance(m, t) for t in ids) and m.is_finished()

    def forced(self, m):
        # no forced-token API: a one-token mask is the only forcing it shows
        tokens = m.get_tokens()
        return tokens if len(tokens) == 1 else []


BACKENDS = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines_core": OutlinesCore}


def byte_vocabulary(tokenizer) -> dict:
    """Token bytes -> ids for a byte-level BPE vocabulary (GPT-2's byte to
    unicode map undone), special tokens left out: outlines_core's Vocabulary
    only builds itself from the hub."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    to_byte = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}
    special = set(tokenizer.all_special_ids)
    vocab = {}
    for text, i in tokenizer.get_vocab().items():
        if i not in special:
            vocab.setdefault(bytes(to_byte[c] for c in text), []).append(i)
    return vocab


def timed(fn, *args):
    t0 = time.perf_counter_ns()
    out = fn(*args)
    return (time.perf_counter_ns() - t0) / 1e3, out


def p95(xs):
    return float(np.percentile(xs, 95)) if xs else float("nan")


def walk(backend, schema, ids, width, draft_len):
    """One pass over the instance's tokens on a fresh matcher: per-position
    costs in microseconds and the forced-token hits."""
    compile_us, m = timed(backend.matcher, schema)
    buf = np.zeros((1, width), np.int32)
    bufs = np.zeros((draft_len + 1, width), np.int32)
    rows = {"mask": [], "advance": [], "forced": [], "validate": [], "draft_masks": [], "rollback": []}
    hits = 0
    forcing = {"ff_positions": 0, "ff_certain": 0, "one_token": 0}
    for i, token in enumerate(ids):
        us, _ = timed(backend.mask_into, m, buf)
        rows["mask"].append(us)
        us, ff = timed(backend.forced, m)
        rows["forced"].append(us)
        allowed = np.flatnonzero(np.unpackbits(buf.view(np.uint8), bitorder="little"))
        forcing["one_token"] += len(allowed) == 1
        if ff:
            # certain: the mask allows the first forced token alone, so any logits pick it
            forcing["ff_positions"] += 1
            forcing["ff_certain"] += len(allowed) == 1 and allowed[0] == ff[0]
        hits += next((j for j, (a, b) in enumerate(zip(ff, ids[i:])) if a != b), min(len(ff), len(ids) - i))
        draft = list(ids[i : i + draft_len])
        if len(draft) == draft_len:
            draft[-1] = wrong_token(width, draft[-1])
            us, _ = timed(backend.validate, m, draft)
            rows["validate"].append(us)
            us, _ = timed(backend.draft_masks, m, draft, bufs)
            rows["draft_masks"].append(us)
        us, ok = timed(backend.advance, m, token)
        rows["advance"].append(us)
        if not ok:
            raise RuntimeError(f"{backend.name} refused the instance's token {i} ({token})")
        if i >= 4:
            us, _ = timed(backend.rollback, m, 4)
            rows["rollback"].append(us)
            for t in ids[i - 3 : i + 1]:
                backend.advance(m, t)
    return compile_us, rows, hits, forcing


def wrong_token(width, token):
    """A token other than `token`: the draft's last token is made wrong so
    that validation sees a rejection, as it does with real drafts."""
    return token + 1 if token + 1 < width * 32 else token - 1


def measure(backend, schema, ids, width, draft_len, passes):
    """Minimum over fresh passes at each position, then mean/p95 over positions."""
    runs = [walk(backend, schema, ids, width, draft_len) for _ in range(passes)]
    out = {"compile_ms": min(r[0] for r in runs) / 1e3, "hits": runs[0][2], **runs[0][3]}
    for key in runs[0][1]:
        per_pos = [min(vals) for vals in zip(*(r[1][key] for r in runs))]
        out[key] = (statistics.fmean(per_pos) if per_pos else float("nan"), p95(per_pos))
    return out


def bits_to_logits(logits, words):
    """Logits with -inf where a bit of the uint32 words is 0, all in MLX."""
    shifts = mx.arange(32, dtype=mx.uint32)
    bits = ((words[..., None] >> shifts) & 1).reshape(*words.shape[:-1], -1)[..., : logits.shape[-1]]
    return mx.where(bits.astype(mx.bool_), logits, -mx.inf)


def mask_appliers(vocab_size):
    """Bitmask (int32 words) -> logits with -inf where disallowed, in MLX,
    on this backend (the libraries' own MLX kernels are Metal-only)."""
    compiled = mx.compile(bits_to_logits)

    def numpy_unpack(logits, mask):
        bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab_size].astype(bool)
        return mx.where(mx.array(bits), logits, -mx.inf)

    out = {
        "numpy unpackbits + mx.where": numpy_unpack,
        "mx shifts + mx.where": lambda logits, mask: bits_to_logits(logits, mx.array(mask.view(np.uint32))),
        "mx.compile(shifts + where)": lambda logits, mask: compiled(logits, mx.array(mask.view(np.uint32))),
    }
    try:
        from xgrammar.kernels.apply_token_bitmask_mlx import apply_token_bitmask_mlx

        out["xgrammar LUT (mx.compile)"] = lambda logits, mask: apply_token_bitmask_mlx(
            mx.array(mask), logits, vocab_size
        )
    except ImportError:
        pass
    return out


def time_appliers(vocab_size, repeats=50):
    rng = np.random.default_rng(0)
    logits = mx.array(rng.standard_normal((1, vocab_size)).astype(np.float32))
    mask = rng.integers(-(2**31), 2**31 - 1, size=(1, (vocab_size + 31) // 32), dtype=np.int32)
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab_size].astype(bool)
    expected = np.where(bits, np.array(logits[0]), -np.inf)
    out = {}
    for name, fn in mask_appliers(vocab_size).items():
        got = fn(logits, mask)
        mx.eval(got)
        assert np.array_equal(np.array(got).reshape(-1), expected), name
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            mx.eval(fn(logits, mask))
            times.append((time.perf_counter_ns() - t0) / 1e3)
        out[name] = (statistics.median(times), p95(times))
    return out


def forward_us(model, repeats=20, context=300):
    """Median one-token forward with `context` cached tokens (what a plain
    greedy step pays), in microseconds."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    mx.eval(model(mx.zeros((1, context), dtype=mx.int32), cache=cache))
    token = mx.array([[42]])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        mx.eval(model(token, cache=cache))
        times.append((time.perf_counter_ns() - t0) / 1e3)
        for c in cache:
            c.trim(1)
    return statistics.median(times)


class ConstraintProcessor:
    """An mlx-lm logits processor: advances the matcher by the tokens
    generated since the last call and masks the logits to what it allows."""

    def __init__(self, backend, matcher, vocab_size, eos):
        self.backend, self.m, self.eos = backend, matcher, eos
        self.buf = np.zeros((1, (vocab_size + 31) // 32), np.int32)
        self.seen = None
        self.apply = mask_appliers(vocab_size)["mx.compile(shifts + where)"]

    def __call__(self, tokens, logits):
        if self.seen is not None:
            for t in tokens[self.seen :].tolist():
                if t in self.eos:
                    # generate_step runs a step ahead: it asks for the position after the end
                    return logits
                if not self.backend.advance(self.m, t):
                    raise RuntimeError(f"{self.backend.name} refused generated token {t}")
        self.seen = tokens.size
        self.backend.mask_into(self.m, self.buf)
        return self.apply(logits, self.buf)


def decode_check(backend, model, tokenizer, schema, request, max_tokens=160):
    """Greedy constrained decoding with mlx-lm's generate_step; returns the
    text, its token count and the jsonschema verdict."""
    import jsonschema
    from mlx_lm.generate import generate_step

    messages = [{"role": "user", "content": f"{request} Answer in JSON following this schema: {json.dumps(schema)}"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    eos = set(tokenizer.eos_token_ids)
    processor = ConstraintProcessor(backend, backend.matcher(schema), model_vocab(model), eos)
    tokens = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens, logits_processors=[processor]):
        token = int(token)
        if token in eos:
            break
        tokens.append(token)
    text = tokenizer.decode(tokens)
    try:
        jsonschema.validate(json.loads(text), schema)
        verdict = "valid"
    except (ValueError, jsonschema.ValidationError) as e:
        verdict = f"INVALID ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    return text, len(tokens), verdict


def model_vocab(model) -> int:
    return model.args.vocab_size


def probe(backend, tokenizer, schema, breaks, fits) -> str:
    """Refused (with the library's message), or what it does with an
    instance that breaks the schema and one that fits it."""
    try:
        backend.matcher(schema)
    except Exception as e:  # each library has its own exception types; the probe reports them all
        return f"refused: {type(e).__name__}: {' '.join(str(e).split())[:110]}"
    verdicts = []
    for instance, want, bad in ((breaks, False, "IGNORED (takes a breaking instance)"), (fits, True, "REJECTS a fit")):
        if instance is not None:
            ids = tokenizer.encode(json.dumps(instance), add_special_tokens=False)
            if backend.fits(backend.matcher(schema), ids, tokenizer.eos_token_id) != want:
                verdicts.append(bad)
    return ", ".join(verdicts) or "enforced"


def fmt(pair):
    return f"{pair[0]:8.1f} {pair[1]:8.1f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="mlx-lm model dir (default: the default model, float32)")
    p.add_argument("--libs", default=",".join(BACKENDS), help="comma-separated, of " + ", ".join(BACKENDS))
    p.add_argument("--passes", type=int, default=3, help="fresh matchers per schema (minimum per position)")
    p.add_argument("--draft", type=int, default=6, help="draft length checked at each position (4-8)")
    p.add_argument("--decode", type=int, default=3, help="schemas for the greedy decoding check (0: none)")
    p.add_argument("--no-probe", action="store_true", help="skip the refused-features probe")
    args = p.parse_args(argv)
    from mlx_lm import load

    path = str(args.model or ensure_default_model("float32"))
    model, tokenizer = load(path)
    hf_tok = tokenizer._tokenizer
    vocab = model_vocab(model)
    width = (vocab + 31) // 32
    step = forward_us(model)
    print(f"model {path}: vocab {vocab} (tokenizer {len(hf_tok)}), one-token forward {step / 1e3:.1f} ms (median)")

    backends = []
    for name in args.libs.split(","):
        if importlib.util.find_spec(name) is None:
            print(f"{name}: not installed, skipped")
            continue
        us, b = timed(BACKENDS[name], hf_tok, vocab)
        print(f"{name} {b.version}: tokenizer setup {us / 1e3:.0f} ms (once per model)")
        backends.append(b)

    print("\nbitmask -> -inf logits in MLX (median, p95 us over 50):")
    for name, pair in time_appliers(vocab).items():
        print(f"  {name:32s} {fmt(pair)}   {pair[0] / step:.3%} of a step")

    heads = "schema           tok lib            compile_ms  mask_mean  mask_p95  adv_mean   ff_mean  rb4_mean"
    heads += "  valid_mean  dmasks_mean  forced_hits"
    print(f"\nper-token costs in us (min over {args.passes} fresh matchers per position; draft {args.draft}):")
    print(heads)
    totals = {b.name: [] for b in backends}
    refused = {b.name: [] for b in backends}
    for name, schema, instance in SCHEMAS:
        ids = hf_tok.encode(json.dumps(instance), add_special_tokens=False)
        for b in backends:
            try:
                r = measure(b, schema, ids, width, args.draft, args.passes)
            except Exception as e:  # a refused schema is a result of the comparison
                refused[b.name].append(name)
                print(f"{name:16s} {len(ids):3d} {b.name:14s} refused: {' '.join(str(e).split())[:90]}")
                continue
            totals[b.name].append(r)
            print(
                f"{name:16s} {len(ids):3d} {b.name:14s} {r['compile_ms']:10.1f} {r['mask'][0]:10.1f} "
                f"{r['mask'][1]:9.1f} {r['advance'][0]:9.1f} {r['forced'][0]:9.1f} {r['rollback'][0]:9.1f} "
                f"{r['validate'][0]:11.1f} {r['draft_masks'][0]:12.1f} {r['hits']:5d}/{len(ids)}"
            )

    print(f"\nsummary over the schemas each library accepted (one step = {step / 1e3:.1f} ms):")
    print(
        "lib            schemas  compile_ms  mask_mean  mask_p95(max)  mask+advance  share  draft_check  share"
        "  forced: hits positions certain one-token-masks"
    )
    for b in backends:
        rs = totals[b.name]
        if not rs:
            continue
        mask = statistics.fmean(r["mask"][0] for r in rs)
        worst = max(r["mask"][1] for r in rs)
        adv = statistics.fmean(r["advance"][0] for r in rs)
        # a speculative step: the draft checked, then the masks at its positions
        draft = statistics.fmean(r["validate"][0] + r["draft_masks"][0] for r in rs)
        f = {k: sum(r[k] for r in rs) for k in ("hits", "ff_positions", "ff_certain", "one_token")}
        print(
            f"{b.name:14s} {len(rs):7d} {statistics.fmean(r['compile_ms'] for r in rs):11.1f} {mask:10.1f} "
            f"{worst:14.1f} {mask + adv:13.1f} {(mask + adv) / step:6.3%} {draft:12.1f} {draft / step:6.3%} "
            f"{f['hits']:14d} {f['ff_positions']:9d} {f['ff_certain']:7d} {f['one_token']:16d}"
            + (f"   refused: {', '.join(refused[b.name])}" if refused[b.name] else "")
        )

    if not args.no_probe:
        print("\nschema features (what each library says):")
        for feature, schema, breaks, fits in PROBES:
            for b in backends:
                print(f"  {feature:18s} {b.name:14s} {probe(b, hf_tok, schema, breaks, fits)}")

    by_name = {name: schema for name, schema, _ in SCHEMAS}
    for name, request in DECODE[: args.decode]:
        print(f"\ngreedy constrained decoding, schema {name}:")
        for b in backends:
            try:
                text, n, verdict = decode_check(b, model, tokenizer, by_name[name], request)
            except Exception as e:  # reported, the other libraries still run
                print(f"  {b.name:14s} failed: {type(e).__name__}: {e}")
                continue
            print(f"  {b.name:14s} {n:3d} tokens, {verdict}: {text!r}")


if __name__ == "__main__":
    main()
