"""The quantization benchmark's pure parts: the held-out split, reading prompt logprobs, agreement."""

from __future__ import annotations

import random

import pytest

from fallback.distill import bundled_prompts
from loadtest.quantize_llm_bench import agreement, argmax_and_logprob, held_out_prompts, main


def test_the_held_out_prompts_are_the_ones_distill_holds_out() -> None:
    prompts = bundled_prompts()
    random.Random(0).shuffle(prompts)  # what fallback.distill.run does with its default seed and fraction
    held = held_out_prompts()
    assert held == prompts[:len(prompts) // 10] and len(held) == 42


def test_prompt_logprobs_give_the_top_token_and_the_actual_tokens_logprob() -> None:
    position = {"504": {"logprob": -9.6, "rank": 1646, "decoded_token": "The"},
                "29": {"logprob": -2.7, "rank": 1, "decoded_token": "-"}}
    assert argmax_and_logprob(position, 504) == (29, -9.6)
    assert argmax_and_logprob({"7": {"logprob": -0.1, "rank": 1}}, 7) == (7, -0.1)  # the answer is the argmax
    with pytest.raises(ValueError, match="no prompt logprobs"):
        argmax_and_logprob(None, 7)


def test_agreement_counts_equal_argmax_positions_over_all_answers() -> None:
    assert agreement([[1, 2, 3], [4]], [[1, 2, 9], [4]]) == 0.75
    assert agreement([[1, 2]], [[1, 2]]) == 1.0
    with pytest.raises(ValueError):
        agreement([[1, 2]], [[1]])  # a candidate must score every reference position


def test_a_folder_that_is_not_a_model_is_refused(tmp_path, capsys) -> None:
    assert main(["--baseline", str(tmp_path), "--quantized", str(tmp_path)]) == 2
    assert "is not a model folder" in capsys.readouterr().err
