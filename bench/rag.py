"""RAG quality: does reranking help retrieval, and are the answers' citations right?

rerank: NFCorpus (../shared/evals), hybrid retrieval of the top 10 files for the first N test
   queries, nDCG@10 as retrieved vs after the LLM yes/no reranker (localai/rag/rerank.py), same
   queries, same run. Uses the index bench/index_nfcorpus.py builds (built here if absent).
rag: python3-doc (the question → page set of bench/index_pydoc.py; the expected pages plus
   --pages distractor pages, so that it fits a session): the full pipeline in-process
   (retrieve → pack → generate → cite). Per question: whether the expected page is among the
   passages given to the model (hit@k), whether a verified citation points into it (cited
   hit), and over all citations the share that verified and the share the model wrote itself
   (not inferred by the checker). --layouts compares prompt layouts (localai/rag/prompt.py) on
   the same questions with the same loaded model, one result object each; the default, `model`,
   is the layout the model's catalog entry names (what `localai ask` uses).
tokens: the same variants' prompt tokens to compute (first and new question), over all questions,
   from the model's vocabulary alone (no weights, minutes faster than ttft).
ttft: time to first token of `localai ask`'s path, today's against each change (bench/rag_ttft.py:
   first question, repeated question, new question over the same pages), with the same
   citation check; --trims lists the variants beside today's (bench/rag_ttft.py).
Prints one JSON object.

    python bench/rag.py [--part rerank|rag|both|ttft] [--queries 20] [--model smollm2-135m]
                        [-k 5] [--pages 60] [--layouts model|system,oneshot] [--questions N]
                        [--threads 2] [--trims head,64,64+kv]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from index_nfcorpus import EVALS, load_qrels, ndcg10, write_corpus  # noqa: E402
from index_pydoc import DOC, QUESTIONS, ensure_docs  # noqa: E402
from rag_ttft import Counter, tokens_only  # noqa: E402
from rag_ttft import run as ttft_run  # noqa: E402

from localai.config import load_settings  # noqa: E402
from localai.engine import Done, Message, SamplingParams, chat  # noqa: E402
from localai.index.facade import Index  # noqa: E402
from localai.rag.answer import Answerer  # noqa: E402
from localai.rag.prompt import LAYOUTS, Layout  # noqa: E402
from localai.rag.rerank import rerank  # noqa: E402
from localai.runtime import model_layout, open_engine, open_index  # noqa: E402

MODELS = os.environ.get("LOCALAI_MODELS", str(Path.home() / ".cache/localai-test/models"))


def rerank_part(engine, work: Path, n_queries: int) -> dict:
    ids = write_corpus(work / "docs", None)
    ix = open_index(load_settings(work / "home", models_dir=MODELS))
    if not ix.stats()["chunks"]:
        ix.add_source(work / "docs")
        ix.update()
    qrels = load_qrels()
    queries = [json.loads(x) for x in (EVALS / "queries.jsonl").read_text().splitlines()]
    plain, reranked, t0 = [], [], time.perf_counter()
    for q in queries[:n_queries]:
        hits = ix.search(q["text"], k=10, unit="file")
        ranked = [ids[Path(h.path).name] for h in hits]
        texts = [p.text for p in ix.read_many(hits)]
        order = rerank(engine, q["text"], texts)
        plain.append(ndcg10(ranked, qrels[q["_id"]]))
        reranked.append(ndcg10([ranked[i] for i in order], qrels[q["_id"]]))
    ix.close()
    return {"queries": len(plain), "ndcg@10_hybrid": round(statistics.mean(plain), 4),
            "ndcg@10_reranked": round(statistics.mean(reranked), 4),
            "rerank_s_per_query": round((time.perf_counter() - t0) / len(plain), 2)}  # fmt: skip


def pydoc_index(work: Path, pages: int) -> Index:
    """An index of python3-doc: the pages named by the questions' expected paths, plus `pages`
    others taken evenly from the sorted page list as distractors (0: the whole documentation)."""
    ensure_docs()
    docs = work / "html"
    if not docs.is_dir():
        every = sorted(p for p in DOC.rglob("*.html") if "_sources" not in p.parts)
        stems = {w.rsplit("/", 1)[-1] for _, w in QUESTIONS}
        wanted = [p for p in every if p.stem in stems or p.stem.removeprefix("asyncio-") == "task"]
        others = [p for p in every if p not in wanted]
        step = max(1, len(others) // pages) if pages else 1
        for p in wanted + others[::step][: pages or None]:
            dest = docs / p.relative_to(DOC)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dest)
    ix = open_index(load_settings(work / "home", models_dir=MODELS))
    if not ix.stats()["chunks"]:
        ix.add_source(docs)
        ix.update()
    return ix


def answer_row(rag: Answerer, question: str, want: str, k: int, params: SamplingParams) -> dict:
    engine = rag.engine
    prep = rag.prepare([Message("user", question)], k, None, params.max_tokens)
    gen = next(ev for ev in chat(engine, prep.messages, params) if isinstance(ev, Done))
    done = rag.finish(prep, gen.text, gen.stats)
    given = [s.passage.path for s in prep.packed.used]
    prompt = len(engine.tokenize(engine.apply_chat_template(prep.messages)))
    return {"question": question, "given_hit": any(want in p for p in given),
            "cited_hit": any(c.verified and want in c.path for c in done.citations),
            "citations": len(done.citations),
            "verified": sum(c.verified for c in done.citations),
            "inferred": sum(c.inferred for c in done.citations),
            "prompt_tokens": prompt, "answer": done.answer}  # fmt: skip


def summary(layout: str, rows: list[dict], k: int, model_default: bool) -> dict:
    n, cits = len(rows), sum(r["citations"] for r in rows)
    verified, inferred = (sum(r[key] for r in rows) for key in ("verified", "inferred"))
    return {"layout": layout, "model_default": model_default, "questions": n, "k": k,
            "hit@k_given": round(sum(r["given_hit"] for r in rows) / n, 3),
            "hit_cited": round(sum(r["cited_hit"] for r in rows) / n, 3),
            "citations": cits,
            "verification_rate": round(verified / cits, 3) if cits else None,
            "inferred_share": round(inferred / cits, 3) if cits else None,
            "written_share": round((cits - inferred) / cits, 3) if cits else None,
            "answers_with_no_citation": sum(r["citations"] == 0 for r in rows),
            "prompt_tokens_mean": round(statistics.mean(r["prompt_tokens"] for r in rows)),
            "rows": rows}  # fmt: skip


def rag_part(engine, ix: Index, layouts: list[Layout], k: int, max_tokens: int,
             questions: int) -> list[dict]:  # fmt: skip
    """Each question is asked under every layout before the next question, so that an
    interrupted run still compares the layouts on the same questions (rows go to stderr)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    rows: dict[str, list[dict]] = {layout.name: [] for layout in layouts}
    asked = QUESTIONS[: questions or None]
    for i, (question, want) in enumerate(asked, 1):
        for layout in layouts:
            row = answer_row(Answerer(ix, engine, layout), question, want, k, params)
            rows[layout.name].append(row)
            print(json.dumps({"time": time.strftime("%H:%M:%S"), "layout": layout.name,
                              "question": i, **row}), file=sys.stderr, flush=True)  # fmt: skip
    own = model_layout(engine.name).name
    return [summary(name, got, k, name == own) for name, got in rows.items()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["rerank", "rag", "both", "ttft", "tokens"], default="both")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--questions", type=int, default=0, help="rag: the first N questions (0: all)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--pages", type=int, default=60, help="distractor pages (0: all)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/localai-bench"))
    ap.add_argument(
        "--layouts",
        default="model",
        help="prompt layouts to compare, comma-separated: model (the catalog entry's), "
        + ", ".join(LAYOUTS),
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--trims",
        default="head,64,64+kv",
        help="ttft: variants beside today's: head, a passage budget in tokens (64), "
        "48k3 for 3 passages of 48, +kv / +kvx for passages' KV kept, put back wherever they "
        "land / only after the same tokens (kv, kvx alone: whole passages)",
    )
    a = ap.parse_args()
    threads = {"threads": a.threads} if a.threads else {}
    settings = load_settings(a.work / "rag-home", models_dir=MODELS, model=a.model,
                             context_length=4096, **threads)  # fmt: skip
    if a.part == "tokens":  # prompt tokens only: the model's vocabulary, no weights loaded
        from localai.catalog import Catalog

        path = Catalog(settings.models_dir).locate(a.model)
        counter = Counter(path, a.model, settings.context_length)
        ix = pydoc_index(a.work / f"pydoc-{a.pages or 'all'}", a.pages)
        asked = QUESTIONS[: a.questions or None]
        got = tokens_only(counter, ix, model_layout(a.model), a.k, a.max_tokens, asked,
                          [n for n in a.trims.split(",") if n])  # fmt: skip
        print(json.dumps({"bench": "rag-tokens", "model": a.model, "k": a.k,
                          "questions": len(asked), "variants": got}))  # fmt: skip
        return
    engine = open_engine(settings, log=lambda m: None)
    out = {"bench": "rag", "model": a.model, "machine": f"{platform.machine()} "
           f"{os.cpu_count()} cpus", "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    if a.part in ("rerank", "both"):
        out["rerank_nfcorpus"] = rerank_part(engine, a.work / "nfcorpus", a.queries)
    if a.part in ("rag", "both"):
        ix = pydoc_index(a.work / f"pydoc-{a.pages or 'all'}", a.pages)
        named = [
            model_layout(engine.name) if n == "model" else LAYOUTS[n] for n in a.layouts.split(",")
        ]
        layouts = list({layout.name: layout for layout in named}.values())  # model,oneshot: once
        out["rag_pydoc"] = rag_part(engine, ix, layouts, a.k, a.max_tokens, a.questions)
        ix.close()
    if a.part == "ttft":
        ix = pydoc_index(a.work / f"pydoc-{a.pages or 'all'}", a.pages)
        trims = [n for n in a.trims.split(",") if n]
        asked = QUESTIONS[: a.questions or None]
        out |= {"k": a.k, "max_tokens": a.max_tokens, "threads": engine.info()["threads"]}
        out["ttft_pydoc"] = ttft_run(engine, ix, model_layout(engine.name), a.k, a.max_tokens,
                                     asked, trims, settings.home / "kv",
                                     log=lambda r: print(json.dumps(r), file=sys.stderr,
                                                         flush=True))  # fmt: skip
        ix.close()
    engine.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
