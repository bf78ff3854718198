"""The stage-1 and stage-2 training loops, single process or under ``torchrun``.

One loop serves both stages; they differ only in the loss (``stage1_loss`` against
N(0, I), ``stage2_loss`` against the stage-1 prior) and in what the checkpoint carries.

Exact resume: the data order is a function of ``(seed, epoch)`` (see
:class:`~ate_fast.align.distributed_sampler.ResumableDistributedSampler`), the loader
draws nothing from the global generator, and the resume state holds the weights, the
optimiser, the scheduler, the gradient scaler, every rank's RNG states and the position
inside the epoch; with ``num_workers > 0`` each item fetched in a worker draws from
generators seeded by ``(seed, epoch, index)``
(:class:`~ate_fast.align.data_loading.WorkerSeededItems`). A run that is killed and
resumed therefore takes the same steps with the same noise as one that is not (bitwise on
CPU), a dataset's own random draws (augmentation) included.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ate_fast.align.checkpoint import (
    CONFIG_FILE,
    KIND_STAGE1,
    RESUME_FILE,
    CheckpointError,
    flatten_optimizer_state,
    load_checkpoint,
    load_resume_state,
    save_checkpoint,
    save_resume_state,
    unflatten_optimizer_state,
)
from ate_fast.align.config import Stage1Config, Stage2Config, TrainConfig
from ate_fast.align.data_loading import WorkerSeededItems, as_dataset, collate_chunks
from ate_fast.align.distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    gather_objects,
    setup_distributed,
    teardown_distributed,
)
from ate_fast.align.distributed_sampler import ResumableDistributedSampler
from ate_fast.align.losses import LossTerms, reconstruction_loss, stage1_loss, stage2_loss
from ate_fast.align.lr_schedule import ExponentialLRWithFloor
from ate_fast.align.metrics_log import MetricsLogger
from ate_fast.align.prior import LatentPrior
from ate_fast.align.rng_state import capture_rng, restore_rng
from ate_fast.align.vae import ActionVAE
from ate_fast.data.split import train_val_split

TRAIN_KEYS = ("loss", "recon", "kl", "mmd", "prior_logp")
VAL_SEED_OFFSET = 1_000_003  # validation noise: its own stream, never the training one


@dataclass
class TrainResult:
    """What a training call returns.

    ``vae``: the trained model (unwrapped, on the training device). ``history``: one
    record per completed epoch (all epochs, including those before a resume).
    ``step_losses``: the rank-averaged total loss of every step taken in *this* call.
    ``checkpoint``: the output directory, or ``None`` without ``out_dir``.
    ``chunks_per_s``: training throughput of this call (global batch × steps / time in
    the training loops; validation excluded, checkpoint writes included).
    """

    vae: ActionVAE
    history: list[dict[str, Any]] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    checkpoint: Optional[Path] = None
    chunks_per_s: float = math.nan


def train_stage1(
    vae: ActionVAE, data: Union[Dataset, Tensor], cfg: Optional[Stage1Config] = None
) -> TrainResult:
    """Stage 1: fit ``vae`` to pre-training chunks with ``SmoothL1 + β·KL(q‖N(0,I)) + γ·MMD``.

    ``data``: a dataset of ``(chunk [H, D], mask [D])`` (e.g. ``ActionChunkDataset``),
    of ``(chunk, mask, steps [H])`` (``ActionChunkDataset(..., step_mask=True)``: padded
    steps left out of the reconstruction loss) or of chunks, or a tensor ``[N, H, D]``.
    Run under ``torchrun`` for several processes.
    """
    return _AlignTrainer(vae, data, cfg or Stage1Config(), stage=1, prior=None).run()


def train_stage2(
    vae: ActionVAE,
    data: Union[Dataset, Tensor],
    prior: LatentPrior,
    cfg: Optional[Stage2Config] = None,
) -> TrainResult:
    """Stage 2: fit ``vae`` to adaptation chunks against the stage-1 ``prior``.

    ``cfg.kl="reverse"`` (default, the paper): ``β·KL(q‖p_pre) + γ·MMD(q, p_pre)``;
    ``"forward"`` (released code): ``β·KL(p_pre‖q) + γ·MMD(q, N(0, I))``.
    ``cfg.init_from``: start from a stage-1 checkpoint's weights.
    """
    if not isinstance(prior, LatentPrior):
        raise TypeError(f"prior: expected a LatentPrior, got {type(prior).__name__}")
    if prior.latent_dim != vae.latent_dim:
        raise ValueError(
            f"prior: latent dim {prior.latent_dim} does not match the VAE's {vae.latent_dim}"
        )
    return _AlignTrainer(vae, data, cfg or Stage2Config(), stage=2, prior=prior).run()


def resolve_precision(precision: str, device: torch.device) -> tuple[Optional[torch.dtype], bool]:
    """``(autocast dtype or None, use a gradient scaler)`` for ``precision`` on ``device``."""
    if precision == "auto":
        if device.type != "cuda":
            return None, False
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp32":
        return None, False
    if precision == "bf16":
        return torch.bfloat16, False
    if device.type != "cuda":
        raise ValueError("precision: 'fp16' needs a CUDA device (use 'bf16' or 'fp32' on CPU)")
    return torch.float16, True


class _AlignTrainer:
    def __init__(
        self,
        vae: ActionVAE,
        data: Union[Dataset, Tensor],
        cfg: TrainConfig,
        stage: int,
        prior: Optional[LatentPrior],
    ) -> None:
        if not isinstance(vae, ActionVAE):
            raise TypeError(f"vae: expected an ActionVAE, got {type(vae).__name__}")
        cfg.validate()
        self.vae, self.data, self.cfg, self.stage, self.prior = vae, data, cfg, stage, prior
        self._worker_items: Optional[WorkerSeededItems] = None  # with num_workers > 0

    # --- entry ----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        ctx = setup_distributed(self.cfg.device)
        try:
            return self._run(ctx)
        finally:
            teardown_distributed(ctx)

    def _say(self, msg: str) -> None:
        if self.ctx.is_main:
            tqdm.write(msg)

    def _run(self, ctx: DistContext) -> TrainResult:
        self.ctx = ctx
        train_set, val_set = self._split_data()
        vae = self.vae.to(ctx.device)
        self._place_prior(vae)
        resuming, resume_path = self._open_out_dir()
        init_from = getattr(self.cfg, "init_from", None)
        if init_from and not resuming:
            self._init_from(vae, init_from)
        self._start_optimisation(vae)
        if resuming:
            self._load_resume(vae, resume_path)
        model = (
            DistributedDataParallel(
                vae, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
            )
            if ctx.is_distributed
            else vae
        )
        sampler = ResumableDistributedSampler(
            train_set, ctx.world_size, ctx.rank, shuffle=True, seed=self.cfg.seed
        )
        logger = MetricsLogger(
            self.out_dir if ctx.is_main else None,
            (self.progress["epoch"], self.progress["global_step"]) if resuming else None,
        )
        step_losses, train_time, steps_run = self._train_epochs(
            model, vae, sampler, self._loader(train_set, sampler), val_set, logger
        )
        if self._unsaved or (self.out_dir is not None and not resuming):
            self._save(vae)
        losses = torch.stack(step_losses).tolist() if step_losses else []
        speed = steps_run * self.cfg.batch_size / train_time if train_time > 0 else math.nan
        return TrainResult(
            vae=vae,
            history=list(self.history),
            step_losses=[float(x) for x in losses],
            checkpoint=self.out_dir,
            chunks_per_s=speed,
        )

    # --- setup ------------------------------------------------------------------------------
    def _split_data(self) -> tuple[Dataset, Optional[Dataset]]:
        """``(train set, val set or None)``; sets the per-rank batch and the steps per epoch,
        and keeps what the dataset knows (normaliser, action space, chunking) for the
        checkpoint."""
        cfg, ctx = self.cfg, self.ctx
        dataset = as_dataset(self.data)
        train_set, val_set = train_val_split(dataset, cfg.val_fraction, cfg.seed)
        if cfg.batch_size % ctx.world_size:
            raise ValueError(
                f"batch_size: the global batch {cfg.batch_size} must divide evenly over "
                f"{ctx.world_size} processes"
            )
        self.per_rank = cfg.batch_size // ctx.world_size
        self.steps_per_epoch = len(train_set) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size={cfg.batch_size} is larger than the {len(train_set)} training "
                f"chunks; lower batch_size (or val_fraction)"
            )
        describe = getattr(dataset, "describe", None)
        if describe is not None:
            self._say(f"stage {self.stage} data: {describe()}")
        self._say(
            f"stage {self.stage}: {len(train_set)} train / {len(val_set or [])} val chunks, "
            f"{self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs, batch {cfg.batch_size}"
            f" over {ctx.world_size} process(es) on {ctx.device}"
        )
        self.normalizer = getattr(dataset, "normalizer", None)
        self.action_space = getattr(dataset, "action_space", None)
        self.chunking = getattr(dataset, "chunking", None)
        return train_set, val_set

    def _place_prior(self, vae: ActionVAE) -> None:
        """The stage-2 prior on the training device (a copy: the caller's prior stays where
        it was), and the prior the metrics' ``prior_logp`` is measured under."""
        device = self.ctx.device
        if self.prior is not None:
            self.prior = copy.deepcopy(self.prior).to(device)
        self.metric_prior = (
            self.prior
            if self.prior is not None
            else LatentPrior.standard_normal(vae.latent_dim).to(device)
        )
        self.prior_variance = (
            None if self.prior is None else self.prior.marginal_variance().mean().item()
        )

    def _open_out_dir(self) -> tuple[bool, Optional[Path]]:
        """``(resuming, path of the resume state)``. Refuses to start over an existing
        checkpoint unless told to, and removes the temp files of a write that was killed."""
        cfg = self.cfg
        self.out_dir = Path(cfg.out_dir) if cfg.out_dir else None
        resume_path = self.out_dir / RESUME_FILE if self.out_dir else None
        resuming = bool(cfg.resume and resume_path is not None and resume_path.is_file())
        if self.out_dir is not None and not resuming and not cfg.overwrite:
            if (self.out_dir / CONFIG_FILE).exists() or resume_path.exists():
                raise FileExistsError(
                    f"out_dir: {self.out_dir} already holds a checkpoint; pass resume=True to "
                    f"continue it or overwrite=True to start over"
                )
        if cfg.resume and not resuming:
            self._say(f"resume: no {RESUME_FILE} in {self.out_dir}; starting from scratch")
        if self.out_dir is not None and self.ctx.is_main:
            for stale in self.out_dir.glob(".*.tmp"):
                stale.unlink()
        return resuming, resume_path

    def _start_optimisation(self, vae: ActionVAE) -> None:
        """Per-rank noise seed, optimiser, scheduler, precision, and a fresh progress."""
        cfg, device = self.cfg, self.ctx.device
        torch.manual_seed(cfg.seed + self.ctx.rank)  # per-rank noise; model init happened before
        self.optimizer = torch.optim.AdamW(
            vae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.scheduler = ExponentialLRWithFloor(self.optimizer, cfg.lr_gamma, cfg.lr_floor)
        self.amp_dtype, use_scaler = resolve_precision(cfg.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.progress = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
        self.history: list[dict[str, Any]] = []
        self.accum = [0.0] * len(TRAIN_KEYS)

    def _loader(self, train_set: Dataset, sampler: ResumableDistributedSampler) -> DataLoader:
        if self.cfg.num_workers > 0:  # a worker's random draws: seeded per item
            train_set = self._worker_items = WorkerSeededItems(train_set, self.cfg.seed)
        return DataLoader(
            train_set,
            batch_size=self.per_rank,
            sampler=sampler,
            drop_last=True,
            collate_fn=collate_chunks,
            num_workers=self.cfg.num_workers,
            pin_memory=self.ctx.device.type == "cuda",
            generator=torch.Generator(),  # keeps the loader off the global RNG stream
        )

    # --- the loops --------------------------------------------------------------------------
    def _train_epochs(
        self,
        model: torch.nn.Module,
        vae: ActionVAE,
        sampler: ResumableDistributedSampler,
        loader: DataLoader,
        val_set: Optional[Dataset],
        logger: MetricsLogger,
    ) -> tuple[list[Tensor], float, int]:
        """The remaining epochs (from the resume position); ``(per-step losses, seconds in
        the training loops, steps taken)``."""
        cfg = self.cfg
        step_losses: list[Tensor] = []
        self._pending: list[Tensor] = []  # step metrics not yet summed (avoids a sync per step)
        self.last_save = time.monotonic()
        train_time, steps_run = 0.0, 0
        self._unsaved = False  # whether the state moved on since the last save
        done = cfg.max_steps is not None and self.progress["global_step"] >= cfg.max_steps
        epochs = range(self.progress["epoch"], cfg.epochs) if not done else range(0)
        for epoch in epochs:
            first = self.progress["step_in_epoch"]
            sampler.set_epoch(epoch, skip=first * self.per_rank)
            if self._worker_items is not None:
                self._worker_items.epoch = epoch
            model.train()
            lr = self.optimizer.param_groups[0]["lr"]
            elapsed, stop = self._train_epoch(model, vae, loader, logger, epoch, lr, step_losses)
            train_time += elapsed
            steps_run += self.progress["step_in_epoch"] - first
            if self.progress["step_in_epoch"] < self.steps_per_epoch:
                break  # stopped part-way (max_steps): the resume state holds the position
            record = self._end_epoch(vae, val_set, epoch, lr, elapsed, first)
            self._unsaved = True
            logger.log(record)
            if self.ctx.is_main:
                tqdm.write(self._format_epoch(record))
            every = cfg.save_every_epochs
            if every and (epoch + 1) % every == 0 and epoch + 1 < cfg.epochs:
                self._save(vae)
            if stop:
                break
        return step_losses, train_time, steps_run

    def _train_epoch(
        self,
        model: torch.nn.Module,
        vae: ActionVAE,
        loader: DataLoader,
        logger: MetricsLogger,
        epoch: int,
        lr: float,
        step_losses: list[Tensor],
    ) -> tuple[float, bool]:
        """The rest of ``epoch`` from the current position, or up to ``max_steps``
        (appending each step's loss to ``step_losses``); ``(seconds, max_steps reached)``."""
        cfg = self.cfg
        first = self.progress["step_in_epoch"]
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=first,
            desc=f"stage{self.stage} epoch {epoch + 1}/{cfg.epochs}",
            disable=not (self.ctx.is_main and cfg.progress),
            leave=False,
            dynamic_ncols=True,
        )
        t0 = interval_t0 = time.perf_counter()
        interval_steps = 0
        stop = False
        batches = iter(loader)
        for step in range(first, self.steps_per_epoch):
            a, mask, steps = next(batches)
            terms = self._train_step(model, vae, a, mask, steps)
            reduced = all_reduce_sum(terms, self.ctx) / self.ctx.world_size
            step_losses.append(reduced[0])
            self._unsaved = True
            self.progress["global_step"] += 1
            self.progress["step_in_epoch"] = step + 1
            gstep = self.progress["global_step"]
            save_now = bool(cfg.save_every_steps and gstep % cfg.save_every_steps == 0)
            self._pending.append(reduced)
            interval_steps += 1
            if gstep % cfg.log_every_steps == 0:
                interval_t0 = self._log_steps(
                    logger, bar, epoch, lr, reduced, interval_steps, interval_t0
                )
                interval_steps = 0
                save_now = save_now or self._save_timer_fired()
            bar.update(1)
            stop = cfg.max_steps is not None and gstep >= cfg.max_steps
            if save_now or stop:
                self._flush_pending()
                self._save(vae)
            if stop:
                break
        bar.close()
        self._flush_pending()
        return time.perf_counter() - t0, stop

    def _log_steps(
        self,
        logger: MetricsLogger,
        bar: tqdm,
        epoch: int,
        lr: float,
        reduced: Tensor,
        steps: int,
        since: float,
    ) -> float:
        """Log the latest step's metrics ``reduced [5]`` with the throughput of the ``steps``
        steps since ``since``; returns the time the interval ended."""
        self._flush_pending()
        values = reduced.double().tolist()  # syncs: the interval timing is exact
        now = time.perf_counter()
        speed = steps * self.cfg.batch_size / (now - since)
        logger.log(
            {
                "split": "step",
                "epoch": epoch + 1,
                "global_step": self.progress["global_step"],
                "lr": lr,
            }
            | dict(zip(TRAIN_KEYS, values))
            | {"chunks_per_s": speed}
        )
        bar.set_postfix(loss=f"{values[0]:.4g}", recon=f"{values[1]:.4g}", kl=f"{values[2]:.3g}")
        return now

    # --- one step ---------------------------------------------------------------------------
    def _flush_pending(self) -> None:
        """Add the device-side step metrics not yet counted to the epoch sums."""
        if self._pending:
            total = torch.stack(self._pending).double().sum(0).tolist()
            self.accum = [s + v for s, v in zip(self.accum, total)]
        self._pending = []

    def _loss(
        self, out, a: Tensor, mask: Optional[Tensor], steps: Optional[Tensor], generator=None
    ) -> LossTerms:
        cfg = self.cfg
        if self.stage == 1:
            return stage1_loss(out, a, mask, cfg.beta, cfg.gamma, generator, steps=steps)
        return stage2_loss(
            out,
            a,
            self.prior,
            mask,
            cfg.beta,
            cfg.gamma,
            cfg.kl,
            cfg.kl_samples,
            generator,
            prior_variance=self.prior_variance,
            steps=steps,
        )

    def _train_step(
        self,
        model: torch.nn.Module,
        vae: ActionVAE,
        a: Tensor,
        mask: Optional[Tensor],
        steps: Optional[Tensor],
    ) -> Tensor:
        device = self.ctx.device
        a = a.to(device, non_blocking=True)
        mask = None if mask is None else mask.to(device, non_blocking=True)
        steps = None if steps is None else steps.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            out = model(a, mask)
        with torch.autocast(device.type, enabled=False):
            terms = self._loss(out, a, mask, steps)
        self.scaler.scale(terms.total).backward()
        if self.cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(vae.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            logp = self.metric_prior.log_prob(out.mu.detach().float()).mean()
        return torch.stack([terms.total, terms.recon, terms.kl, terms.mmd, logp]).detach().float()

    # --- epoch end ----------------------------------------------------------------------------
    def _end_epoch(
        self,
        vae: ActionVAE,
        val_set: Optional[Dataset],
        epoch: int,
        lr: float,
        elapsed: float,
        first_step: int,
    ) -> dict[str, Any]:
        cfg = self.cfg
        n = self.steps_per_epoch
        record: dict[str, Any] = {
            "split": "epoch",
            "epoch": epoch + 1,
            "global_step": self.progress["global_step"],
            "lr": lr,
        }
        record.update({k: v / n for k, v in zip(TRAIN_KEYS, self.accum)})
        steps_run = n - first_step
        record["chunks_per_s"] = steps_run * cfg.batch_size / elapsed if elapsed > 0 else math.nan
        record["epoch_time_s"] = elapsed
        if val_set is not None and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
            record.update(self._validate(vae, val_set))
        self.scheduler.step()
        self.history.append(record)
        self.progress.update(epoch=epoch + 1, step_in_epoch=0)
        self.accum = [0.0] * len(TRAIN_KEYS)
        return record

    def _format_epoch(self, r: dict[str, Any]) -> str:
        parts = [f"stage{self.stage} epoch {r['epoch']}/{self.cfg.epochs}"]
        for key in ("loss", "recon", "kl", "mmd", "prior_logp", "val_loss", "val_prior_logp"):
            if key in r:
                parts.append(f"{key} {r[key]:.4g}")
        parts.append(f"lr {r['lr']:.3g}")
        parts.append(f"{r['chunks_per_s']:.1f} chunks/s")
        return " | ".join(parts)

    @torch.no_grad()
    def _validate(self, vae: ActionVAE, val_set: Dataset) -> dict[str, float]:
        """Validation metrics, each a mean over val chunks (rank-sharded, then summed)."""
        ctx, device = self.ctx, self.ctx.device
        shard = Subset(val_set, list(range(ctx.rank, len(val_set), ctx.world_size)))
        loader = DataLoader(shard, batch_size=self.per_rank, collate_fn=collate_chunks)
        gen = torch.Generator(device).manual_seed(self.cfg.seed + VAL_SEED_OFFSET + ctx.rank)
        # sums of: loss, recon, kl, mmd, count (batches of >= 2), recon_mu, prior_logp, count
        sums = torch.zeros(8, dtype=torch.float64, device=device)
        was_training = vae.training
        vae.eval()
        for a, mask, steps in loader:
            a = a.to(device)
            mask = None if mask is None else mask.to(device)
            steps = None if steps is None else steps.to(device)
            b = a.shape[0]
            with torch.autocast(
                device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
            ):
                out = vae(a, mask, generator=gen)
                recon_mu = vae.decode(out.mu)
            with torch.autocast(device.type, enabled=False):
                if b >= 2:  # the unbiased MMD needs two samples
                    t = self._loss(out, a, mask, steps, gen)
                    sums[0:4] += torch.stack([t.total, t.recon, t.kl, t.mmd]).double() * b
                    sums[4] += b
                sums[5] += reconstruction_loss(recon_mu, a, mask, steps=steps).double() * b
                sums[6] += self.metric_prior.log_prob(out.mu.float()).double().sum()
                sums[7] += b
        vae.train(was_training)
        all_reduce_sum(sums, ctx)
        s = sums.tolist()
        full, count = max(s[4], 1.0), max(s[7], 1.0)
        return {
            "val_loss": s[0] / full,
            "val_recon": s[1] / full,
            "val_kl": s[2] / full,
            "val_mmd": s[3] / full,
            "val_recon_mu": s[5] / count,
            "val_prior_logp": s[6] / count,
        }

    # --- checkpoints ----------------------------------------------------------------------------
    def _save_timer_fired(self) -> bool:
        """Whether ``save_every_minutes`` has passed, agreed by all ranks (rank 0 decides)."""
        minutes = self.cfg.save_every_minutes
        if minutes is None or self.out_dir is None:
            return False
        fired = torch.tensor(
            [1.0 if time.monotonic() - self.last_save >= 60.0 * minutes else 0.0],
            device=self.ctx.device,
        )
        if not self.ctx.is_main:
            fired.zero_()
        return bool(all_reduce_sum(fired, self.ctx).item() > 0)

    def _init_from(self, vae: ActionVAE, path: str) -> None:
        ckpt = load_checkpoint(path, kind=KIND_STAGE1)  # a stage-2 checkpoint is refused
        if ckpt.vae.config != vae.config:
            raise ValueError(
                f"init_from: {path} holds a VAE with config {ckpt.vae.config}, which does not "
                f"match this one {vae.config}"
            )
        vae.load_state_dict(ckpt.vae.state_dict())
        self._say(f"stage {self.stage}: initialised from {path}")

    def _save(self, vae: ActionVAE) -> None:
        """Resume state + model checkpoint (rank 0 writes; every rank sends its RNG state)."""
        if self.out_dir is None:
            return
        rng_tensors, rng_meta = capture_rng(self.ctx.device)
        rng_tensors = {k: v.cpu() for k, v in rng_tensors.items()}
        everyone = gather_objects((rng_tensors, rng_meta), self.ctx)
        if self.ctx.is_main:
            tensors = {f"model.{k}": v for k, v in vae.state_dict().items()}
            opt_tensors, opt_meta = flatten_optimizer_state(self.optimizer.state_dict())
            tensors.update(opt_tensors)
            for rank, (t, _) in enumerate(everyone):
                tensors.update({f"rng.{rank}.{k}": v for k, v in t.items()})
            if self.prior is not None:
                tensors.update({f"prior.{k}": v for k, v in self.prior.state_dict().items()})
            meta = {
                "stage": self.stage,
                "vae": vae.config,
                "config": self.cfg.to_dict(),
                "progress": dict(self.progress),
                "history": self.history,
                "accum": self.accum,
                "optimizer": opt_meta,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": [m for _, m in everyone],
                "world_size": self.ctx.world_size,
                "chunking": self.chunking,
            }
            save_resume_state(self.out_dir / RESUME_FILE, tensors, meta)
            save_checkpoint(
                self.out_dir,
                vae,
                stage=self.stage,
                normalizer=self.normalizer,
                action_space=self.action_space,
                chunking=self.chunking,
                prior=self.prior,
                train_config=self.cfg.to_dict(),
                progress={**self.progress, "history_tail": self.history[-1:]},
            )
        barrier(self.ctx)
        self.last_save = time.monotonic()
        self._unsaved = False

    def _load_resume(self, vae: ActionVAE, path: Path) -> None:
        tensors, meta = load_resume_state(path)
        if meta["stage"] != self.stage:
            raise CheckpointError(f"{path}: a stage-{meta['stage']} run, not stage {self.stage}")
        if meta["vae"] != vae.config:
            raise CheckpointError(
                f"{path}: the run's VAE config {meta['vae']} differs from this one {vae.config}"
            )
        vae.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if self.prior is not None:
            saved = {k[6:]: v for k, v in tensors.items() if k.startswith("prior.")}
            mine = self.prior.state_dict()
            if set(saved) != set(mine) or any(
                not torch.equal(saved[k], mine[k].cpu()) for k in mine
            ):
                raise CheckpointError(f"{path}: the run was trained against a different prior")
        self.optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta["optimizer"]))
        self.scheduler.load_state_dict(meta["scheduler"])
        if meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.progress = {k: int(v) for k, v in meta["progress"].items()}
        self.history = list(meta["history"])
        self.accum = [float(x) for x in meta["accum"]]
        saved_cfg = meta["config"]
        for key in ("batch_size", "seed", "lr", "weight_decay", "lr_gamma", "lr_floor"):
            if saved_cfg.get(key) != getattr(self.cfg, key):
                warnings.warn(
                    f"resume: {key} was {saved_cfg.get(key)!r}, now {getattr(self.cfg, key)!r}; "
                    f"the result will differ from an uninterrupted run",
                    stacklevel=3,
                )
        if meta.get("chunking", self.chunking) != self.chunking:  # e.g. --mask-padding changed
            warnings.warn(
                f"resume: the run's chunks were cut as {meta['chunking']}, now as "
                f"{self.chunking}; the result will differ from an uninterrupted run",
                stacklevel=3,
            )
        rank = self.ctx.rank
        if meta["world_size"] == self.ctx.world_size:
            mine = {
                k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"rng.{rank}.")
            }
            restore_rng(mine, meta["rng"][rank], self.ctx.device)
        else:
            warnings.warn(
                f"resume: the run had {meta['world_size']} processes, now {self.ctx.world_size}; "
                f"random streams restart, so the result will differ from an uninterrupted run",
                stacklevel=3,
            )
        self._say(
            f"resumed {path} at epoch {self.progress['epoch']} step "
            f"{self.progress['step_in_epoch']} (global step {self.progress['global_step']})"
        )
