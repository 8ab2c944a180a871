"""The teacher's side of a distillation: its answers to the prompts, and its top-k token targets.

Both are computed once per run (answers are cached in the work folder, so a resumed run
does not ask again) and read by ``fallback.distill``'s training loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Example:
    prompt_ids: list[int]
    answer_ids: list[int]


def chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _answers(teacher: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, samples: int,
             temperature: float) -> list[list[list[int]]]:
    """Per prompt, the teacher's greedy answer (``samples == 0``) or ``samples`` sampled answers."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [chat_ids(tokenizer, p) for p in prompts]
    width = max(len(e) for e in encoded)
    input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    attention = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.95, "top_k": 0,
                "num_return_sequences": samples} if samples else {"do_sample": False}
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        generated = teacher.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                     pad_token_id=pad, **sampling)
    per_prompt = max(samples, 1)
    rows = generated[:, width:].tolist()
    answers: list[list[list[int]]] = []
    for i in range(len(prompts)):
        answers.append([])
        for row in rows[i * per_prompt:(i + 1) * per_prompt]:
            answer = []
            for token in row:
                answer.append(token)
                if token == tokenizer.eos_token_id:
                    break
            answers[-1].append(answer)
    return answers


def teacher_answers(teacher: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, cache: Path,
                    samples: int = 0, temperature: float = 0.8, batch_size: int = 16) -> list[list[Example]]:
    """The teacher's answers to each prompt: its greedy answer (``samples == 0``), or ``samples`` answers
    sampled at ``temperature`` (top-p 0.95). Cached in ``cache``, one JSON line per prompt, so an
    interrupted run resumes."""
    from tqdm import tqdm

    done: dict[str, list[Example]] = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            row = json.loads(line)
            answers = row["answers"] if "answers" in row else [row["answer_ids"]]
            if len(answers) == max(samples, 1):  # a cache from a run with another sample count is redone
                done[row["prompt"]] = [Example(row["prompt_ids"], a) for a in answers]
    todo = [p for p in prompts if p not in done]
    per_batch = max(1, batch_size // max(samples, 1))
    label = f"teacher answers ({samples} sampled each)" if samples else "teacher answers (greedy)"
    with cache.open("a") as out:
        for start in tqdm(range(0, len(todo), per_batch), desc=label, unit="batch", disable=not todo):
            batch = todo[start:start + per_batch]
            for prompt, answers in zip(batch, _answers(teacher, tokenizer, batch, max_new_tokens, samples,
                                                       temperature), strict=True):
                ids = chat_ids(tokenizer, prompt)
                done[prompt] = [Example(ids, a) for a in answers]
                out.write(json.dumps({"prompt": prompt, "prompt_ids": ids, "answers": answers}) + "\n")
            out.flush()
    return [done[p] for p in prompts]


def batch_tensors(examples: list[Example], pad: int) -> tuple[Any, Any, Any]:
    """input ids, attention mask, and a mask of the positions whose *next* token is an answer token."""
    import torch

    rows = [e.prompt_ids + e.answer_ids for e in examples]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    predict = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, e) in enumerate(zip(rows, examples, strict=True)):
        ids[i, :len(row)] = torch.tensor(row)
        attention[i, :len(row)] = 1
        predict[i, len(e.prompt_ids) - 1:len(row) - 1] = True
    return ids, attention, predict


def teacher_targets(teacher: Any, examples: list[Example], pad: int, top_k: int, batch_size: int = 16
                    ) -> list[tuple[Any, Any]]:
    """The teacher's top-k logits at each example's answer positions, computed once.

    Distilling against the top k (64 of 49,152) keeps nearly all of the teacher's probability
    mass and takes the teacher's forward pass out of every training step. The pass runs in
    bfloat16, as the served teacher does.
    """
    import torch
    from tqdm import tqdm

    targets: list[tuple[Any, Any]] = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for start in tqdm(range(0, len(examples), batch_size), desc="teacher targets", unit="batch"):
            chunk = examples[start:start + batch_size]
            ids, attention, predict = batch_tensors(chunk, pad)
            values, indices = answer_logits(teacher, ids, attention, predict).float().topk(top_k, dim=-1)
            offset = 0
            for count in predict.sum(1).tolist():
                targets.append((values[offset:offset + count].clone(), indices[offset:offset + count].clone()))
                offset += count
    return targets


def answer_logits(model: Any, ids: Any, attention: Any, predict: Any) -> Any:
    """Logits at the answer positions only (the LM head over 49K words is most of the cost)."""
    hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state
    return model.lm_head(hidden[predict])
