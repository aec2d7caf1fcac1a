"""The compute of one miner: its stage's forward and backward passes on
frames, local AdamW steps, and the global (merged) weights it started from.

Synchronous and single-threaded on purpose: the miner runs one call at a
time off its event loop, so a forward never races a backward or a merge.

Backward passes are exact: a forward keeps its input and its autograd graph;
if the weights changed since (an optimizer step or a merge), the forward is
recomputed from the kept input under the current weights before the
backward, because autograd cannot run a graph whose weights were updated
in place.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from iota.allreduce import OuterNesterov
from iota.allreduce.outer import flatten, unflatten_into
from iota.codec import Codec, FrameError
from iota.data import TokenDataset
from iota.errors import IotaError
from iota.model.recipe import Recipe
from iota.model.train import TrainConfig, make_optimizer

RAW = Codec.from_string("bf16")


class WorkError(IotaError):
    """A forward or backward request this stage cannot do (bad frame, wrong shape, unknown sample)."""


ADVERSARIES = ("random", "random_backward", "stale", "lazy", "poison", "replay")
POISON_SCALE = 8.0  # the poison adversary's merge contribution is noise this many times the honest one's norm
KEEP_VERSIONS = 32  # weight snapshots kept for audits (validators audit work seconds old)
KEEP_WORK = 64  # recent forwards kept for audits


@dataclass(frozen=True)
class Work:
    """A recent forward, as an audit needs it: the weights version, the input and what was sent."""

    version: int
    input: bytes | None  # the input frame (None on stage 0: the input is the sample's tokens)
    output: bytes  # the frame sent on (activations forward; input gradients from the last stage)
    loss: float | None
    backward_since_merge: int


@dataclass(frozen=True)
class BackwardWork:
    """A recent backward of a middle stage, as an audit needs it."""

    version: int  # the weights the gradient was taken under
    input: bytes  # the forward's input frame
    gradient: bytes  # the output gradient received from the next stage
    output: bytes  # the input gradient sent to the previous stage


def weights_digest(flat: torch.Tensor) -> str:
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


@dataclass
class Kept:
    """What a forward keeps until its backward arrives."""

    input: torch.Tensor  # token ids (first stage) or the decoded boundary tensor
    frame: bytes | None  # the input frame (None on stage 0)
    output: torch.Tensor
    version: int
    created: float


def frame_seed(sample: int, attempt: int, stage: int, direction: str) -> int:
    """The stochastic-rounding seed of one crossing: fixed by the work, so anyone can recompute the frame."""
    digest = hashlib.sha256(f"{sample}/{attempt}/{stage}/{direction}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class StageWorker:
    """Stage `index` of the recipe's model, trained by this miner."""

    def __init__(self, recipe: Recipe, vocab_size: int, index: int, data: TokenDataset,
                 adversary: str | None = None) -> None:
        if adversary not in (None, *ADVERSARIES):
            raise ValueError(f"adversary must be one of {ADVERSARIES}, not {adversary!r}")
        self.recipe, self.index, self.data, self.adversary = recipe, index, data, adversary
        self.snapshots: OrderedDict[int, tuple[torch.Tensor, str]] = OrderedDict()
        self.work: OrderedDict[tuple[int, int], Work] = OrderedDict()
        self.backward_work: OrderedDict[tuple[int, int], BackwardWork] = OrderedDict()
        # What the next stage vouched for with each backward frame it sent here (for audits of it).
        self.received: OrderedDict[tuple[int, int], dict[str, object]] = OrderedDict()
        self.rng = torch.Generator().manual_seed(index)
        self.module = recipe.build(vocab_size)[index]
        self.module.train()
        self.params = list(self.module.parameters())
        self.outer = OuterNesterov(flatten(self.params), lr=recipe.outer_lr, momentum=recipe.outer_momentum)
        self.inner = TrainConfig(lr=recipe.lr, weight_decay=recipe.weight_decay, grad_clip=recipe.grad_clip)
        self.optimizer = make_optimizer(self.module, self.inner)
        compression = recipe.compression_parts()
        self.forward_codec = compression.forward or RAW
        self.backward_codec = compression.backward or RAW
        self.reembed = compression.bottleneck.reembed
        self.in_width = compression.bottleneck.width or recipe.dim
        self.kept: dict[tuple[int, int], Kept] = {}
        self.version = 0  # bumps whenever the weights change
        self.global_version = -1
        self.global_digest = ""
        self.lr = recipe.lr
        self.pending = 0  # backward passes since the last optimizer step
        self.samples_since_merge = 0

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.recipe.stages - 1

    def batch(self, sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.batch(sample, self.recipe.batch, self.recipe.seq_len, seed=self.recipe.seed)

    # -- forward and backward ------------------------------------------------------

    def forward(self, sample: int, attempt: int, frame: bytes | None) -> tuple[bytes, float | None]:
        """Run the stage on a sample.

        Returns (activation frame for the next stage, None), or for the last
        stage (gradient frame for the previous stage, loss): the last stage
        does its backward at once.
        """
        tokens, targets = self.batch(sample)
        if self.is_first:
            x = tokens
        else:
            x = self._decode(frame, self.in_width).requires_grad_()
        extra = {"tokens": tokens} if self.reembed and not self.is_first else {}
        version, since_merge = self.version, self.samples_since_merge  # as the weights were at this forward
        received = None if frame is None else bytes(frame)
        self._snapshot()
        if self.is_last:
            loss = self.module(x, targets, **extra)
            (loss / self.recipe.accumulate).backward()
            value, grad = loss.item(), x.grad
            if self.adversary == "random":
                value, grad = float(torch.rand((), generator=self.rng)) * 6, self._noise(grad)
            out = self._encode(grad, self.backward_codec, sample, attempt, "backward")
            self._after_backward()
        else:
            output = self.module(x, **extra)
            self.kept[(sample, attempt)] = Kept(x, received, output, version, time.monotonic())
            value = None
            out = self._encode(self._noise(output) if self.adversary == "random" else output, self.forward_codec,
                               sample, attempt, "forward")
        if self.adversary == "replay":
            out = self._replayed(sample, out)
        self._keep(self.work, (sample, attempt), Work(version, received, out, value, since_merge))
        return out, value

    @staticmethod
    def _keep(records: OrderedDict, key: tuple[int, int], value: object) -> None:
        records[key] = value
        while len(records) > KEEP_WORK:
            records.popitem(last=False)

    def _replayed(self, sample: int, fresh: bytes) -> bytes:
        """What a replaying miner sends: the frame it sent for another sample last (a valid frame)."""
        return next((w.output for (s, _), w in reversed(self.work.items()) if s != sample), fresh)

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        """What a cheating miner sends instead of its work: noise of the same shape and scale."""
        return torch.randn(like.shape, generator=self.rng) * float(like.detach().std())

    def _snapshot(self) -> None:
        if self.version not in self.snapshots:
            flat = flatten(self.params)
            self.snapshots[self.version] = (flat, weights_digest(flat))
            while len(self.snapshots) > KEEP_VERSIONS:
                self.snapshots.popitem(last=False)

    def commitment(self, sample: int, attempt: int) -> dict[str, object]:
        """What this miner vouches for about a forward it did: output digest, weights digest, versions."""
        work = self.work[(sample, attempt)]
        return {"stage": self.index, "output": hashlib.sha256(work.output).hexdigest(),
                "weights": self.snapshots[work.version][1], "global_version": self.global_version,
                "backward_since_merge": work.backward_since_merge}

    def audit(self, sample: int, attempt: int) -> tuple[dict[str, object], bytes] | None:
        """A recent forward for a validator, as (header, payload), or None if it is no longer kept.

        The header is the commitment plus the loss and section sizes; the
        payload is the input frame, the output frame and the flat float32 weights.
        """
        work = self.work.get((sample, attempt))
        if work is None or work.version not in self.snapshots:
            return None
        inputs = work.input or b""
        header = {**self.commitment(sample, attempt), "loss": work.loss, "input_bytes": len(inputs),
                  "output_bytes": len(work.output)}
        return header, inputs + work.output + self.snapshots[work.version][0].numpy().tobytes()

    def backward_commitment(self, sample: int, attempt: int) -> dict[str, object] | None:
        """What this miner vouches for about a backward frame it sent: its digest and the weights'
        (None once that work is no longer kept).

        The last stage's backward frame is the output of its forward, so it vouches with that."""
        if self.is_last:
            return self.commitment(sample, attempt) if (sample, attempt) in self.work else None
        work = self.backward_work.get((sample, attempt))
        return None if work is None else self._backward_commitment(work)

    def _backward_commitment(self, work: BackwardWork) -> dict[str, object]:
        return {"stage": self.index, "output": hashlib.sha256(work.output).hexdigest(),
                "weights": self.snapshots[work.version][1]}

    def audit_backward(self, sample: int, attempt: int) -> tuple[dict[str, object], bytes] | None:
        """A recent backward of a middle stage for a validator, as (header, payload), or None if not kept.

        The payload is the forward's input frame, the gradient received, the gradient sent and
        the flat float32 weights the backward ran under."""
        work = self.backward_work.get((sample, attempt))
        if work is None or work.version not in self.snapshots:
            return None
        header = {**self._backward_commitment(work), "input_bytes": len(work.input),
                  "gradient_bytes": len(work.gradient), "output_bytes": len(work.output)}
        return header, work.input + work.gradient + work.output + self.snapshots[work.version][0].numpy().tobytes()

    def note_received(self, sample: int, attempt: int, commitment: dict[str, object]) -> None:
        self._keep(self.received, (sample, attempt), commitment)

    def backward(self, sample: int, attempt: int, frame: bytes) -> bytes | None:
        """Backward of a kept forward; returns the gradient frame for the previous stage (None on stage 0)."""
        kept = self.kept.pop((sample, attempt), None)
        if kept is None:
            raise WorkError(f"stage {self.index} holds no forward of sample {sample} attempt {attempt} "
                            "(it expired, or was never run here)")
        grad = self._decode(frame, kept.output.shape[-1])
        if grad.shape != kept.output.shape:
            raise WorkError(f"gradient of shape {tuple(grad.shape)} for an output of shape {tuple(kept.output.shape)}")
        output, x = kept.output, kept.input
        self._snapshot()  # the weights this backward runs under, for audits
        if kept.version != self.version:
            if not self.is_first:
                x = x.detach().requires_grad_()
            tokens = self.batch(sample)[0]
            extra = {"tokens": tokens} if self.reembed and not self.is_first else {}
            output = self.module(x, **extra)
        output.backward(grad.to(output.dtype))
        version = self.version
        self._after_backward()
        if self.is_first:
            return None
        sent = self._noise(x.grad) if self.adversary == "random_backward" else x.grad
        out = self._encode(sent, self.backward_codec, sample, attempt, "backward")
        assert kept.frame is not None
        self._keep(self.backward_work, (sample, attempt), BackwardWork(version, kept.frame, bytes(frame), out))
        return out

    def recompute_backward(self, sample: int, attempt: int, frame: bytes, gradient: bytes) -> bytes:
        """The input-gradient frame of a middle stage's backward from scratch, under the current
        weights, changing nothing (audits)."""
        x = self._decode(frame, self.in_width).requires_grad_()
        extra = {"tokens": self.batch(sample)[0]} if self.reembed else {}
        output = self.module(x, **extra)
        grad = self._decode(gradient, output.shape[-1])
        (x_grad,) = torch.autograd.grad(output, x, grad.to(output.dtype))
        return self._encode(x_grad, self.backward_codec, sample, attempt, "backward")

    def forget(self, older_than: float) -> list[tuple[int, int]]:
        """Drop forwards kept since before `older_than` (monotonic seconds); returns their keys."""
        stale = [key for key, kept in self.kept.items() if kept.created < older_than]
        for key in stale:
            del self.kept[key]
        return stale

    def drop(self, sample: int, attempt: int) -> None:
        self.kept.pop((sample, attempt), None)

    def _after_backward(self) -> None:
        self.pending += 1
        self.samples_since_merge += 1
        if self.pending < self.recipe.accumulate:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        torch.nn.utils.clip_grad_norm_(self.params, self.recipe.grad_clip)
        if self.adversary != "lazy":  # a lazy miner does the passes it is paid for, not the training
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending = 0
        self.version += 1

    def check_frame(self, frame: bytes | memoryview, direction: str) -> None:
        """Refuse a frame that is malformed or of the wrong shape before it is queued (raises WorkError)."""
        width = self.in_width if direction == "forward" else self.module.boundary_width
        shape = (self.recipe.batch, self.recipe.seq_len, width)
        try:
            header = Codec.header(frame)
        except FrameError as exc:
            raise WorkError(f"bad {direction} frame: {exc}") from None
        if tuple(header["shape"]) != shape:
            raise WorkError(f"stage {self.index} takes {direction} frames of shape {shape}, "
                            f"got {tuple(header['shape'])}")

    def _decode(self, frame: bytes | None, width: int) -> torch.Tensor:
        shape = (self.recipe.batch, self.recipe.seq_len, width)
        if frame is None:
            raise WorkError(f"stage {self.index} needs an input frame")
        try:
            tensor = Codec.decode(frame)
        except FrameError as exc:
            raise WorkError(f"bad frame: {exc}") from None
        if tuple(tensor.shape) != shape:
            raise WorkError(f"stage {self.index} takes frames of shape {shape}, got {tuple(tensor.shape)}")
        return tensor.float()

    def _encode(self, tensor: torch.Tensor | None, codec: Codec, sample: int, attempt: int, direction: str) -> bytes:
        assert tensor is not None
        return codec.encode(tensor.detach().contiguous(), seed=frame_seed(sample, attempt, self.index, direction))

    # -- global weights ------------------------------------------------------------

    def load_global(self, version: int, digest: str, state: bytes) -> None:
        """Adopt merged weights (joining, or catching up after a merge this miner missed)."""
        self.outer.load_bytes(state)
        unflatten_into(self.outer.weights, self.params)
        self.optimizer.zero_grad(set_to_none=True)
        self.pending = 0
        self.samples_since_merge = 0
        self.version += 1
        self.global_version, self.global_digest = version, digest

    def poison(self) -> None:
        """The "poison" adversary, just before a merge: local weights whose pseudo-gradient
        is noise POISON_SCALE times the norm of the honest one."""
        honest = self.outer.pseudo_gradient(flatten(self.params))
        noise = torch.randn(honest.shape, generator=self.rng)
        noise *= POISON_SCALE * honest.norm() / noise.norm()
        unflatten_into(self.outer.weights - noise, self.params)
        self.version += 1

    def merged(self, version: int) -> str:
        """After an outer step changed the weights in place: record the new version; returns its digest."""
        self.optimizer.zero_grad(set_to_none=True)
        self.pending = 0
        self.samples_since_merge = 0
        self.version += 1
        self.global_version = version
        self.global_digest = hashlib.sha256(self.outer.to_bytes()).hexdigest()
        return self.global_digest
