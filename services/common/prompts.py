"""Every prompt reinstruct sends to a model, as named, versioned templates.

A record keeps the `id` ("name@version") of the template that produced it. Change a template's text
only together with its version. Data is substituted with str.format on named fields; nothing in a
generated text is ever evaluated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    version: int
    text: str

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    def render(self, **fields: str) -> str:
        return self.text.format(**fields)


_REGISTRY: dict[str, PromptTemplate] = {}


def _register(name: str, version: int, text: str) -> PromptTemplate:
    template = PromptTemplate(name, version, text)
    _REGISTRY[template.id] = template
    return template


def get(template_id: str) -> PromptTemplate:
    return _REGISTRY[template_id]


def all_templates() -> list[PromptTemplate]:
    return list(_REGISTRY.values())


# ---- Self-Instruct: instruction generation (Wang et al. 2023, Table 5) --------------------------
INSTRUCTIONS = _register("self_instruct.instructions", 1, "Come up with a series of tasks:\n{numbered}")
CLASSIFICATION_INSTRUCTIONS = _register(
    "self_instruct.classification_instructions",
    1,
    "Come up with a series of classification tasks. Try to specify the possible output labels when possible.\n"
    "{numbered}",
)


def numbered_instructions(instructions: list[str]) -> str:
    """'1. first\\n2. second\\n...N+1.' as in the reference encode_prompt (whitespace collapsed, no ':')."""
    cleaned = [re.sub(r"\s+", " ", text).strip().rstrip(":") for text in instructions]
    lines = [f"{i + 1}. {text}\n" for i, text in enumerate(cleaned)]
    return "".join(lines) + f"{len(instructions) + 1}."


# ---- Self-Instruct: classification identification --------------------------------------------
IS_CLASSIFICATION = _register(
    "self_instruct.is_classification",
    1,
    "Can the following task be regarded as a classification task with finite output labels?\n\n"
    "Task: Given a movie review, tell whether the reviewer liked the movie.\nIs it classification? Yes\n\n"
    "Task: Write a short poem about the sea.\nIs it classification? No\n\n"
    "Task: Decide whether the given number is prime.\nIs it classification? Yes\n\n"
    "Task: Summarize the paragraph in one sentence.\nIs it classification? No\n\n"
    "Task: Which of the two sentences is grammatical, A or B?\nIs it classification? Yes\n\n"
    "Task: Suggest three names for a coffee shop.\nIs it classification? No\n\n"
    "Task: {instruction}\nIs it classification?",
)

# ---- Self-Instruct: instance generation -------------------------------------------------------
INSTANCES_INPUT_FIRST = _register(
    "self_instruct.instances_input_first",
    1,
    "Come up with examples for the following tasks. Try to generate multiple examples when possible. "
    "If the task doesn't require additional input, you can generate the output directly.\n\n"
    "{demonstrations}Task: {instruction}\n",
)
INSTANCES_OUTPUT_FIRST = _register(
    "self_instruct.instances_output_first",
    1,
    "Given the classification task definition and the class labels, generate an input that corresponds "
    "to each of the class labels. If the task doesn't require input, just generate the correct class "
    "label.\n\n"
    "{demonstrations}Task: {instruction}\n",
)


def input_first_block(instances: list[tuple[str, str]]) -> str:
    """The body after 'Task: ...\\n' in the input-first layout."""
    parts = []
    for i, (inp, out) in enumerate(instances, start=1):
        parts.append(f"Example {i}\n" + (f"Input: {inp}\n" if inp.strip() else "") + f"Output: {out}\n")
    return "".join(parts)


def output_first_block(instances: list[tuple[str, str]]) -> str:
    """The body after 'Task: ...\\n' in the output-first layout (label first, then its input)."""
    return "".join(f"Class label: {out}\nInput: {inp}\n" for inp, out in instances)


# ---- Instruction tuning: several templates per task (FLAN style) -------------------------------
TRAIN_WITH_INPUT = [
    _register("train.with_input.a", 1, "{instruction}\n\nInput: {input}\n\nOutput:"),
    _register("train.with_input.b", 1, "Task: {instruction}\nInput: {input}\nAnswer:"),
    _register("train.with_input.c", 1, "{instruction}\n\n{input}\n\nResponse:"),
    _register("train.with_input.d", 1, "Instruction: {instruction}\nContext: {input}\nResponse:"),
]
TRAIN_NO_INPUT = [
    _register("train.no_input.a", 1, "{instruction}\n\nOutput:"),
    _register("train.no_input.b", 1, "Task: {instruction}\nAnswer:"),
    _register("train.no_input.c", 1, "Instruction: {instruction}\nResponse:"),
]
# Where a plain-template answer ends when the model does not end it with EOS: the start of the next
# part of the template's own layout (a chat answer ends at EOS only).
PLAIN_ANSWER_ENDS = ("\n\nInput:", "\n\nOutput:", "\nTask:", "\nInstruction:", "\nContext:", "\nAnswer:")
# The user turn for chat models (the chat template adds the roles and the answer cue).
CHAT_WITH_INPUT = [
    _register("chat.with_input.a", 1, "{instruction}\n\n{input}"),
    _register("chat.with_input.b", 1, "{instruction}\n\nInput: {input}"),
    _register("chat.with_input.c", 1, "Input: {input}\n\n{instruction}"),
]
CHAT_NO_INPUT = [_register("chat.no_input.a", 1, "{instruction}")]
# Evaluation always uses the first of each list (services/common/rendering.py), so scores are
# comparable across rounds.

# ---- Evaluation: pairwise judge -----------------------------------------------------------------
PAIRWISE_JUDGE = _register(
    "judge.pairwise",
    1,
    "Which response follows the instruction better? Answer with a short reason, then a last line "
    "'Verdict: A', 'Verdict: B' or 'Verdict: tie'.\n\n"
    "Instruction: {instruction}\n{input_block}"
    "Response A: {response_a}\n\nResponse B: {response_b}\n\nReason:",
)

# ---- Instruction backtranslation (Li et al. 2023, "Self-Alignment with Instruction Backtranslation") --
BACKWARD = _register(
    "backtranslation.backward",
    1,
    "Below is a response. Write the instruction that it answers.\n\nResponse: {output}\n\nInstruction:",
)
# Humpback's self-curation rubric (Li et al. 2023, Table 19): the 5-point scale of how well an answer is
# written as an AI assistant's answer to the instruction. v2 asked for a reason, then "Score: N", and
# parsed the generated text; a 135M model restates the rubric instead (0 of 24 ratings readable). v3 is
# the same rubric as a user turn whose answer is pre-filled up to "Score: ": the rating is read from the
# model's probabilities of "1".."5" (services/generator/backtranslation.py), so it is always readable.
# What a self-curation rating can be: 0 when none could be read, else the rubric's 1-5.
CURATION_SCORES = tuple(range(6))
CURATE = _register(
    "backtranslation.curate",
    3,
    "Below is an instruction from an user and a candidate answer. Evaluate whether or not the answer is a good "
    "example of how AI Assistant should respond to the user's instruction. Please assign a score using the "
    "following 5-point scale:\n"
    "1: It means the answer is incomplete, vague, off-topic, controversial, or not exactly what the user asked "
    "for. For example, some content seems missing, numbered list does not start from the beginning, the opening "
    "sentence repeats user's question. Or the response is from another person's perspective with their personal "
    "experience (e.g. taken from blog posts), or looks like an answer from a forum. Or it contains promotional "
    "text, navigation text, or other irrelevant information.\n"
    "2: It means the answer addresses most of the asks from the user. It does not directly address the user's "
    "question. For example, it only provides a high-level methodology instead of the exact solution to user's "
    "question.\n"
    "3: It means the answer is helpful but not written by an AI Assistant. It addresses all the basic asks from "
    "the user. It is complete and self contained with the drawback that the response is not written from an AI "
    "assistant's perspective, but from other people's perspective. The content looks like an excerpt from a blog "
    "post, web page, or web search results. For example, it contains personal experience or opinion, mentions "
    "comments section, or share on social media, etc.\n"
    "4: It means the answer is written from an AI assistant's perspective with a clear focus of addressing the "
    "instruction. It provide a complete, clear, and comprehensive response to user's question or instruction "
    "without missing or irrelevant information. It is well organized, self-contained, and written in a helpful "
    "tone. It has minor room for improvement, e.g. more concise and focused.\n"
    "5: It means it is a perfect answer from an AI Assistant. It has a clear focus on being a helpful AI "
    "Assistant, where the response looks like intentionally written to address the user's question or "
    "instruction without any irrelevant sentences. The answer provides high quality content, demonstrating expert "
    "knowledge in the area, is very well written, logical, easy-to-follow, engaging and insightful.\n\n"
    "<instruction>\n{instruction}\n</instruction>\n\n<answer>\n{output}\n</answer>\n\n"
    'Rate the answer. Reply with "Score: <rating>" only.',
)
