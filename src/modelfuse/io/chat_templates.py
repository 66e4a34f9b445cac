"""Chat templates a recipe names (``chat_template: chatml``), and the choice of one for the output tokenizer.

The named templates render exactly as mergekit 0.1.5's templates of the same names (whitespace included), so a
recipe gives the same prompts in both tools; ``tests/test_tokenizer_merge.py`` renders conversations with both.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from modelfuse.errors import RecipeError

_SEP = "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}"

NAMED_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "llama3": (
        "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}{{ '<|start_header_id|>' + "
        "message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"),
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}{{ bos_token }}"
        "{% for message in turns %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('After the optional system message, conversation roles must alternate "
        "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
        "{% if loop.first and system is defined %}{{ ' [INST] ' + system + '\\n\\n' + message['content'] + "
        "' [/INST]' }}{% else %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% else %}"
        "{{ raise_exception('Only user and assistant roles are supported, with the exception of an initial "
        "optional system message!') }}{% endif %}{% endfor %}"),
    "alpaca": (
        "{% set systems = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{{ (systems | last).content | trim if systems else '' }}{{ '\\n\\n' }}"
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + "
        "(message['content'] | trim) }}" + _SEP + "{% elif message['role'] == 'assistant' %}"
        "{{ '### Response:\\n' + (message['content'] | trim) }}" + _SEP + "{% elif message['role'] == "
        "'user_context' %}{{ '### Input:\\n' + (message['content'] | trim) }}" + _SEP + "{% endif %}{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '### Response:\\n' }}"
        "{% endif %}"),
    "exaone": (
        "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
        "{{ '        [|system|][|endofturn|]\\n\\n' }}{% endif %}{{ '    [|' + message['role'] + '|]' + "
        "message['content'] + '\\n' }}{% if message['role'] == 'user' %}{{ '        \\n\\n' }}{% else %}"
        "{{ '        [|endofturn|]\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
        "{{ '    [|assistant|]\\n' }}{% endif %}"),
}


def model_chat_template(folder: Path) -> str | None:
    """A model folder's own chat template (``chat_template.jinja``, else ``tokenizer_config.json``'s; of a
    list of named templates, the one named ``default``), or None."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        return None
    if isinstance(template, list):
        template = next((item.get("template") for item in template if item.get("name") == "default"), None)
    return template if isinstance(template, str) and template else None


def resolve_chat_template(value: str | None, folders: Sequence[Path]) -> str | None:
    """The Jinja text of the recipe's ``chat_template``: a name above, ``auto`` (the template most of the
    models in ``folders`` have, the first of them on a tie; None when none has one) or a Jinja template.

    Raises:
        RecipeError: If the value is neither a known name nor a Jinja template.
    """
    if value is None:
        return None
    if value == "auto":
        found = [template.strip() for template in map(model_chat_template, folders) if template]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    if "{" not in value or len(value) < 20:
        raise RecipeError(f"chat_template: {value!r} is neither a template name ({', '.join(NAMED_TEMPLATES)}, auto) "
                          "nor a Jinja template")
    return value
