"""Captions from CoCa's decoder, as open_clip 3.3's `CoCa.generate` writes them, without transformers.

open_clip builds its search from transformers' logits processors and `BeamSearchScorer`, which transformers 5 no
longer has; the same steps are written here. Its defaults are kept (`Generation`): beam search over summed raw logits
(open_clip feeds no log-softmax), hypotheses scored by their sum over their length, at most 30 tokens with the start
and end tokens, the end token banned before 5. open_clip splits its 6 beams into 3 groups but passes no diversity
penalty, so its groups are three copies of one search: one group's `num_beams // num_beam_groups` beams are searched
here, with the same result. Where the caption stays within the decoder's window (seq_len - 1 <= max_seq_len, as by
default), each step runs the new token alone through a key-value cache (nets/coca.py CaptionSteps) and the image
tokens' keys are made once; otherwise each step runs the whole prefix, as open_clip's does."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils.errors import UserError

GENERATIONS = ("beam_search", "greedy", "top_k", "top_p")


@dataclass(frozen=True)
class Generation:
    """open_clip's `generate` settings and defaults. seq_len counts the start and end tokens; max_seq_len is the
    window of the last tokens the decoder sees; temperature divides the sampled logits (top_k, top_p)."""
    generation: str = "beam_search"
    seq_len: int = 30
    max_seq_len: int = 77
    min_seq_len: int = 5
    temperature: float = 1.0
    top_k: int = 1
    top_p: float = 0.1
    num_beams: int = 6
    num_beam_groups: int = 3
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.generation not in GENERATIONS:
            raise UserError(f"generation {self.generation!r} is not one of {', '.join(GENERATIONS)}")
        if not self.seq_len > self.min_seq_len >= 0:
            raise UserError(f"seq_len ({self.seq_len}) must be larger than min_seq_len ({self.min_seq_len})")
        if self.generation == "beam_search" and (self.num_beam_groups < 1 or self.num_beams % self.num_beam_groups):
            raise UserError(f"num_beams ({self.num_beams}) must be a multiple of num_beam_groups "
                            f"({self.num_beam_groups})")
        if self.top_k < 1 or not 0.0 <= self.top_p <= 1.0 or self.temperature <= 0 or self.repetition_penalty <= 0:
            raise UserError("top_k must be at least 1, top_p within [0, 1], temperature and repetition_penalty above 0")


def processed(tokens: torch.Tensor, logits: torch.Tensor, settings: Generation, eot: int) -> torch.Tensor:
    """transformers' MinLengthLogitsProcessor then RepetitionPenaltyLogitsProcessor, as open_clip chains them."""
    if tokens.shape[-1] < settings.min_seq_len:
        logits = logits.clone()
        logits[:, eot] = -float("inf")
    if settings.repetition_penalty != 1.0:
        seen = logits.gather(1, tokens)
        logits = logits.scatter(1, tokens, torch.where(seen < 0, seen * settings.repetition_penalty,
                                                       seen / settings.repetition_penalty))
    return logits


def filtered(logits: torch.Tensor, settings: Generation) -> torch.Tensor:
    """transformers' TopKLogitsWarper / TopPLogitsWarper (keeping at least one token): the rest set to -inf."""
    if settings.generation == "top_k":
        k = min(settings.top_k, logits.shape[-1])
        return logits.masked_fill(logits < logits.topk(k)[0][..., -1:], -float("inf"))
    ordered, order = logits.sort(descending=False)
    drop = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - settings.top_p
    drop[..., -1:] = False
    return logits.masked_fill(drop.scatter(1, order, drop), -float("inf"))


@torch.no_grad()
def generate(net, pixels: torch.Tensor, sot: int, eot: int, settings: Generation = Generation(), pad: int = 0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, L) token ids of a caption per image, from the start token on (the end token, then `pad`, after it):
    open_clip's `model.generate(pixels, generation_type=..., ...)` for a CoCa `net` (nets/clip.py's CLIP with a
    text_decoder). sot / eot: the tokenizer's start and end ids. `generator` seeds top_k / top_p sampling."""
    if not getattr(net, "writes_captions", False):
        raise UserError("this model has no caption decoder: captions come from a CoCa (--phi coca_ViT-B-32 "
                        "--model_path laion2b_s13b_b90k, or mscoco_finetuned_laion2b_s13b_b90k)")
    context = net.text.context_length
    if settings.seq_len > context:
        raise UserError(f"seq_len {settings.seq_len} is longer than the text tower's {context} tokens")
    image_tokens = net.visual.forward_with_tokens(pixels)[1]
    if settings.generation == "beam_search":
        return _beam_search(net, image_tokens, sot, eot, pad, settings)
    return _one_token_at_a_time(net, image_tokens, sot, eot, pad, settings, generator)


class _NextLogits:
    """The next token's (N, vocab) logits given all tokens so far (N, P): the decoder's key-value cache fed the last
    one, or the last `window` tokens run whole where a longer caption would slide past the cache's positions."""

    def __init__(self, net, image_tokens: torch.Tensor, settings: Generation, beams: int = 1):
        self.net = net
        self.window = min(settings.max_seq_len, net.text.context_length)
        # Captions stop at seq_len tokens, so the decoder sees at most seq_len - 1.
        self.steps = net.caption_steps(image_tokens, beams) if settings.seq_len - 1 <= self.window else None
        self.image_tokens = image_tokens.repeat_interleave(beams, dim=0) if self.steps is None else None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.steps is not None:
            return self.steps.next(tokens[:, -1:]).float()
        return self.net.caption_logits(self.image_tokens, tokens[:, -self.window:], last=True).float()

    def keep(self, rows: torch.Tensor) -> None:
        """The rows' new order (a beam search's sources)."""
        if self.steps is not None:
            self.steps.keep(rows)


def _one_token_at_a_time(net, image_tokens, sot, eot, pad, settings: Generation, generator) -> torch.Tensor:
    """open_clip's sampling loop (greedy: the processed logits' argmax instead of a draw)."""
    n = image_tokens.shape[0]
    next_logits = _NextLogits(net, image_tokens, settings)
    window = next_logits.window
    out = torch.full((n, 1), sot, dtype=torch.long, device=image_tokens.device)
    while True:
        finished = (out[:, -1] == eot) | (out[:, -1] == pad)
        if finished.all():
            break
        x = out[:, -window:]
        logits = next_logits(out)
        sample = torch.full((n, 1), pad, dtype=torch.long, device=out.device)
        going = ~finished
        scores = processed(x[going], logits[going], settings, eot)
        if x.shape[1] + 1 == settings.seq_len:
            sample[going] = eot
        elif settings.generation == "greedy":
            sample[going] = scores.argmax(dim=-1, keepdim=True)
        else:
            probs = F.softmax(filtered(scores, settings) / settings.temperature, dim=-1)
            sample[going] = torch.multinomial(probs, 1, generator=generator)
        out = torch.cat([out, sample], dim=1)
        if out.shape[1] >= settings.seq_len:
            break
    return out


class _Hypotheses:
    """transformers' BeamHypotheses (length_penalty 1, early_stopping False): the `size` best finished captions."""

    def __init__(self, size: int):
        self.size, self.beams, self.worst = size, [], 1e9

    def add(self, tokens: torch.Tensor, total: float, length: int) -> None:
        score = total / length
        if len(self.beams) < self.size or score > self.worst:
            self.beams.append((score, tokens))
            if len(self.beams) > self.size:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def done(self, best_total: float, length: int) -> bool:
        return len(self.beams) >= self.size and self.worst >= best_total / length

    def best(self) -> torch.Tensor:
        return sorted(self.beams, key=lambda b: b[0])[-1][1]


def _beam_search(net, image_tokens, sot, eot, pad, settings: Generation) -> torch.Tensor:
    """open_clip's `_generate_beamsearch` with one of its identical beam groups (see the module's docstring)."""
    n, beams = image_tokens.shape[0], settings.num_beams // settings.num_beam_groups
    device = image_tokens.device
    next_logits = _NextLogits(net, image_tokens, settings, beams)
    tokens = torch.full((n * beams, 1), sot, dtype=torch.long, device=device)
    totals = torch.full((n, beams), -1e9, device=device)
    totals[:, 0] = 0  # the beams start alike: only the first may pick the first tokens
    totals = totals.view(-1)
    found = [_Hypotheses(beams) for _ in range(n)]
    done = [False] * n
    while True:
        logits = processed(tokens, next_logits(tokens), settings, eot)
        vocab = logits.shape[-1]
        step = (logits + totals[:, None]).view(n, beams * vocab)
        top, where = step.topk(2 * beams, dim=1, largest=True, sorted=True)
        length = tokens.shape[1] + 1
        next_totals = torch.zeros(n, beams, device=device)
        next_tokens = torch.full((n, beams), pad, dtype=torch.long, device=device)
        sources = torch.arange(n * beams, device=device).view(n, beams)  # a finished image's rows stay put
        for b in range(n):
            if done[b]:
                continue
            kept = 0
            for rank, (total, index) in enumerate(zip(top[b].tolist(), where[b].tolist())):
                row, token = b * beams + index // vocab, index % vocab
                if token == eot:
                    if rank < beams:
                        found[b].add(tokens[row].clone(), total, length)
                else:
                    next_totals[b, kept], next_tokens[b, kept], sources[b, kept] = top[b, rank], token, row
                    kept += 1
                if kept == beams:
                    break
            done[b] = found[b].done(top[b].max().item(), length)
        tokens = torch.cat([tokens[sources.view(-1)], next_tokens.view(-1, 1)], dim=1)
        totals = next_totals.view(-1)
        if all(done) or tokens.shape[1] >= settings.seq_len:
            break
        next_logits.keep(sources.view(-1))
    for b in range(n):  # open beams join the finished ones, with their length so far
        if not done[b]:
            for row in range(b * beams, (b + 1) * beams):
                found[b].add(tokens[row], totals[row].item(), tokens.shape[1])
    best = [found[b].best() for b in range(n)]
    lengths = [len(t) for t in best]
    width = min(max(lengths) + 1, settings.seq_len)
    out = torch.full((n, width), pad, dtype=torch.long, device=device)
    for b, t in enumerate(best):
        out[b, :len(t)] = t
        if len(t) < width:
            out[b, len(t)] = eot
    return out


def captions(tokenizer, ids: torch.Tensor) -> list[str]:
    """Each row's text, from after the start token to before the end token."""
    return [tokenizer.decode(row) for row in ids]
