"""llama.cpp against transformers on the same GGUF file: greedy tokens, teacher-forced top-1, tokenizer, template.

    tifa export gguf --check tiny-q8_0.gguf --reference models/tiny

Why a second implementation and not a read-back: a file can parse and still compute something else
(tensors in the wrong place, rope in the wrong order, another tokenizer). So llama.cpp runs the file and
its greedy tokens and logits are compared with transformers' on the reference model (the original
folder, or transformers' own GGUF loader reading the same weights). The file is validated first by
`models.gguf_file.read_gguf`, so a hostile file fails with one line before llama.cpp parses it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from tifaforge.export.gguf import load_source
from tifaforge.models.gguf_file import GGUFFile, open_llama, read_gguf

FT = gguf.LlamaFileType

CHECK_CONVERSATIONS = [
    [{"role": "system", "content": "你是沈清雅，江南书香门第的才女，说话温婉而带刺。"},
     {"role": "user", "content": "清雅姑娘，今晚的月色真美，你愿意陪我走走吗？"}],
    [{"role": "user", "content": "写一段雨夜客栈里两位剑客重逢的描写。"}],
    [{"role": "user", "content": "Tell me a short story about a lighthouse keeper and a storm."}],
    [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "<think>打个招呼。</think>你好呀！"},
     {"role": "user", "content": "给我讲讲你自己。"}],
]
CHECK_TEXTS = [  # tokenization: zh, en, digits, full-width punctuation, the role tags, think tags
    "江南的雨，下了整整三天。“你来了？”她低声问道。",
    "The lighthouse keeper counted 1234 waves before dawn.",
    "<|begin▁of▁sentence|>系统<|User|>你好<|Assistant|><think>想一想</think>好的。<|end▁of▁sentence|>",
    "  spaces\tand\nnewlines\r\n 全角：「引号」…… emoji 🙂",
]


@dataclass
class PromptResult:
    """One prompt: both sides' greedy tokens; teacher-forced on the reference's tokens, per position, the
    reference's top-1 margin, the largest |Δlogit| over the vocabulary, and llama.cpp's argmax."""
    prompt: list[int]
    ref: list[int]  # transformers' greedy continuation
    ours: list[int]  # llama.cpp's
    margin: np.ndarray  # (n,) the reference's top-1 logit minus its top-2
    max_abs_diff: np.ndarray  # (n,)
    llama_argmax: np.ndarray  # (n,)


@dataclass
class CheckReport:
    path: Path
    file_type: str
    size: int
    tensors: int
    reference: str
    prompts: int = 0
    greedy_equal: int = 0  # prompts whose greedy continuations are identical token for token
    top1: float = 0.0  # llama.cpp argmax == reference greedy token, teacher-forced on the reference's tokens
    max_abs_logit: float = 0.0
    tokenization_equal: bool | None = None  # with a reference tokenizer
    template_equal: bool | None = None
    nonfinite: list[str] = field(default_factory=list)  # tensors holding NaN or Inf
    results: list[PromptResult] = field(default_factory=list)  # per prompt, for a closer look (tests)

    def ok(self, min_top1: float) -> bool:
        return (not self.nonfinite and self.top1 >= min_top1 and self.tokenization_equal is not False
                and self.template_equal is not False)

    def lines(self) -> list[str]:
        yes = {True: "equal", False: "DIFFERENT", None: "not checked (no --reference)"}
        return [
            f"file          {self.path} ({self.file_type}, {self.size / 2**20:.1f} MiB, {self.tensors} tensors): valid",
            "weights       " + (f"{len(self.nonfinite)} tensor(s) hold NaN or Inf: {', '.join(self.nonfinite[:5])}"
                               if self.nonfinite else "all finite"),
            f"reference     {self.reference}",
            f"greedy        {self.greedy_equal}/{self.prompts} prompts token-for-token equal",
            f"top-1         {self.top1:.1%} agreement (teacher-forced), max |Δlogit| {self.max_abs_logit:.4g}",
            f"tokenization  {yes[self.tokenization_equal]}",
            f"template      {yes[self.template_equal]}",
        ]


def check_gguf(path: str | Path, reference: str | Path | None = None, n_tokens: int = 24) -> CheckReport:
    """Validate `path`, then run it in llama.cpp and compare greedy tokens with transformers'."""
    path = Path(path)
    info = read_gguf(path)
    ftype = info.metadata.get("general.file_type")
    report = CheckReport(path, FT(ftype).name if ftype in FT._value2member_map_ else "?", info.size,
                         len(info.tensors), str(reference) if reference else "transformers' GGUF loader, same file")
    report.nonfinite = nonfinite_tensors(path)
    with tempfile.TemporaryDirectory() as work:
        model, tok = _reference(path, reference, Path(work))
        llm = open_llama(path, logits_all=True)
        try:
            prompts = [_prompt_ids(llm, info, conv) for conv in CHECK_CONVERSATIONS]
            _compare(report, model, llm, prompts, n_tokens)
            if tok is not None:
                report.tokenization_equal = all(_llama_ids(llm, t) == tok(t, add_special_tokens=False).input_ids
                                                 for t in CHECK_TEXTS)
                report.template_equal = _template_equal(info, tok)
        finally:
            llm.close()
    return report


def nonfinite_tensors(path: Path) -> list[str]:
    """Names of the tensors with a NaN or an infinity, each dequantised in turn (gguf-py's numpy
    kernels; one tensor in memory at a time). Without a reference, a file of NaN weights would
    otherwise be compared with transformers reading the same NaNs."""
    from gguf.quants import dequantize

    bad = []
    for t in gguf.GGUFReader(path).tensors:
        values = np.asarray(t.data) if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) \
            else dequantize(t.data, t.tensor_type)
        if not np.isfinite(values).all():
            bad.append(t.name)
    return bad


def _reference(path: Path, reference, workdir: Path):
    """(transformers model, tokenizer or None) to compare with: the original folder, else the GGUF."""
    if reference is not None:
        model, tok, _ = load_source(reference, workdir)
        return model.float(), tok
    from transformers import AutoModelForCausalLM

    import torch

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), None  # its GGUF tokenizer read-back is not faithful (pitfall 5): not compared


def _llama_ids(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def _prompt_ids(llm, info: GGUFFile, conversation: list[dict]) -> list[int]:
    """The conversation through the file's own chat template (llama-cpp-python's Jinja), as users run it."""
    template = info.metadata.get("tokenizer.chat_template")
    if not template:
        return _llama_ids(llm, "\n".join(m["content"] for m in conversation))
    return _llama_ids(llm, _render_file_template(info, conversation))


def _render_file_template(info: GGUFFile, conversation: list[dict]) -> str:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    tokens, md = info.metadata.get("tokenizer.ggml.tokens", []), info.metadata

    def text(key):
        i = md.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else ""

    import jinja2

    try:
        fmt = Jinja2ChatFormatter(md["tokenizer.chat_template"], eos_token=text("tokenizer.ggml.eos_token_id"),
                                  bos_token=text("tokenizer.ggml.bos_token_id"))
        return fmt(messages=conversation).prompt
    except jinja2.TemplateError as e:  # SecurityError (the sandbox refused it), syntax and undefined errors
        from tifaforge.errors import TifaError

        raise TifaError(f"{info.path}: tokenizer.chat_template cannot be rendered ({type(e).__name__}: {e}); "
                        "rewrite or drop the template in the source model and export again") from None


def _template_equal(info: GGUFFile, tok) -> bool:
    from tifaforge.chat.template import render

    if not info.metadata.get("tokenizer.chat_template"):
        return not tok.chat_template
    return all(_render_file_template(info, conv) == render(conv, tok, add_generation_prompt=True)
               for conv in CHECK_CONVERSATIONS)


def _compare(report: CheckReport, model, llm, prompts: list[list[int]], n: int) -> None:
    report.results = [_compare_prompt(model, llm, ids, n) for ids in prompts]
    report.prompts = len(prompts)
    report.greedy_equal = sum(r.ours == r.ref for r in report.results)
    report.top1 = sum(int((r.llama_argmax == np.asarray(r.ref)).sum()) for r in report.results) / (n * len(prompts))
    # np.max keeps a NaN (Python's max() would drop it depending on order and print 0 for NaN logits)
    report.max_abs_logit = float(np.max([r.max_abs_diff.max() for r in report.results]))


def _compare_prompt(model, llm, ids: list[int], n: int) -> PromptResult:
    ref = _greedy_hf(model, ids, n)
    ours = _greedy_llama(llm, ids, n)
    hf_logits = _hf_logits(model, ids + ref)[len(ids) - 1:-1]  # (n, V): predictions of ref's tokens
    llm.reset()
    llm.eval(ids + ref)
    lc_logits = np.asarray(llm.scores[len(ids) - 1:len(ids) + n - 1])
    top2 = np.partition(hf_logits, -2, axis=-1)[:, -2:]  # [second, first]
    return PromptResult(ids, ref, ours, top2[:, 1] - top2[:, 0],
                        np.abs(lc_logits - hf_logits).max(-1), lc_logits.argmax(-1))


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def _greedy_hf(model, ids: list[int], n: int) -> list[int]:
    """Plain argmax decoding with the KV cache, n tokens (end tokens do not stop it: both sides run n)."""
    import torch

    out, x, past = [], torch.tensor([ids]), None
    with torch.inference_mode():
        for _ in range(n):
            o = model(input_ids=x, cache=past, use_cache=True)
            past, nxt = o.cache, int(o.logits[0, -1].argmax())
            out.append(nxt)
            x = torch.tensor([[nxt]])
    return out


def _greedy_llama(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def print_check(report: CheckReport, min_top1: float) -> int:
    """The report for `tifa export gguf --check/--verify`; the exit status (1 below `min_top1`)."""
    print("\n".join(report.lines()))
    ok = report.ok(min_top1)
    print("check         " + ("ok" if ok else f"FAILED (non-finite weights, top-1 below {min_top1:.0%}, or "
                                             "tokenization/template differ)"))
    return 0 if ok else 1
