"""fusion/data: the texts every model reads and the character spans that are scored."""

from __future__ import annotations

import json
from pathlib import Path

import _fusion_tokenizers as tokenizers
from modelfuse.fusion.data import read_fusion_texts

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}")


def _conversations(tmp_path: Path) -> Path:
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on"},
                          {"role": "user", "content": "the dog"}, {"role": "assistant", "content": "ate 12"}]}]
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return data


def test_a_conversation_scores_each_assistant_turn_and_its_end_of_turn_token(tmp_path: Path) -> None:
    tokenizer = tokenizers.byte_level()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    [text] = read_fusion_texts(str(_conversations(tmp_path)), tokenizer)
    assert text.text.startswith("<|im_start|>user\nthe cat<|im_end|>\n")
    assert [text.text[start:end] for start, end in text.scored] == ["sat on<|im_end|>", "ate 12<|im_end|>"]
    encoded = tokenizer(text.text, return_offsets_mapping=True, add_special_tokens=False)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    scored_ends = [token for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
                   if token == end_of_turn and any(a <= start and end <= b for a, b in text.scored)]
    assert len(scored_ends) == 2  # the user turns' <|im_end|> are not scored, the assistant turns' are


def test_a_template_whose_end_of_turn_is_no_special_token_scores_the_text_alone(tmp_path: Path) -> None:
    tokenizer = tokenizers.byte_level()
    tokenizer.chat_template = CHATML  # <|im_end|> is plain text for this tokenizer
    [text] = read_fusion_texts(str(_conversations(tmp_path)), tokenizer)
    assert [text.text[start:end] for start, end in text.scored] == ["sat on", "ate 12"]


def test_without_a_template_the_last_assistant_turn_is_scored(tmp_path: Path) -> None:
    [text] = read_fusion_texts(str(_conversations(tmp_path)), tokenizers.byte_level())
    assert text.text == "the cat\nsat on\nthe dog\nate 12"
    assert [text.text[start:end] for start, end in text.scored] == ["ate 12"]


def test_prompt_answer_examples_score_the_answer(tmp_path: Path) -> None:
    data = tmp_path / "tasks.jsonl"
    data.write_text(json.dumps({"prompt": "12 + 34 =", "answer": "46", "split": "train"}) + "\n", encoding="utf-8")
    [text] = read_fusion_texts(str(data), tokenizers.byte_level())
    assert text.text.endswith("46") and [text.text[a:b] for a, b in text.scored] == ["46"]


def test_the_end_of_turn_token_is_a_scored_token(tmp_path: Path) -> None:
    from modelfuse.fusion.logits import encode

    tokenizer = tokenizers.byte_level()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    [text] = read_fusion_texts(str(_conversations(tmp_path)), tokenizer)
    encoded = encode(tokenizer, text, 512)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    flags = [flag for token, flag in zip(encoded.ids, encoded.label_scored, strict=True) if token == end_of_turn]
    assert flags == [False, True, False, True]  # user, assistant, user, assistant
    assert encoded.label_scored[-1] is False  # the final EOS: the text ends with the template's newline, unscored
