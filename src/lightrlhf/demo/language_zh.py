"""The demo language written in Chinese characters (`demo.language=zh`).

The Chinese demo is the English demo's language with every word written as one Chinese character
of the same meaning (the six requests as two-character words), full-width punctuation and no
spaces: `explain river stone :` is `解释河岩：`, the response `the river is calm .` is `其河是静。`.
The map is one-to-one, so every corpus row, every gold score and every annotator judgement of the
Chinese demo is the English one's, translated: the two demos are the same task, and a difference
between them is a difference in how the framework handles the text (tokenizer, truncation, display),
never in how hard the task is. A test checks that the gold score survives the round trip.

One character is one word, so the Chinese tokenizers (character-level) see exactly one token per
English word-level token, and the English length targets (5 and 12 words) are character counts.

The pretraining corpus also holds a few everyday greetings (`GREETINGS`), so that a model trained on
it can complete the classic `你好，世界！` (their characters outside the task's vocabulary carry no
gold score: for the gold they are unknown words).
"""

from __future__ import annotations

import re

from lightrlhf.demo.language import REQUESTS, TOPIC_OF, vocabulary

# Two-character requests, in the order of `language.REQUESTS` (brief ones first).
REQUEST_ZH = {"list": "列举", "briefly": "简述", "summarize": "概括",
              "explain": "解释", "describe": "描述", "discuss": "讨论"}
PUNCTUATION_ZH = {".": "。", ",": "，", ":": "：", "!": "！", "?": "？"}
WORD_ZH = {
    # function words
    "the": "其", "a": "一", "is": "是", "are": "皆", "and": "和", "of": "的", "with": "与", "in": "在",
    "to": "到", "it": "它", "that": "那", "this": "这", "on": "上", "for": "为", "by": "被", "as": "如",
    "so": "故", "very": "很", "can": "能", "has": "有", "there": "彼", "near": "近", "under": "下", "over": "过",
    # polite style words
    "kindly": "请", "gladly": "乐", "clearly": "明", "gently": "柔", "truly": "诚", "warmly": "暖",
    "happily": "欣", "honestly": "实", "wonderful": "妙", "helpful": "助", "lovely": "美", "careful": "慎",
    "bright": "亮", "calm": "静", "fair": "公", "thanks": "谢",
    # rude style words
    "ugh": "唉", "whatever": "随", "boring": "闷", "stupid": "蠢", "lazy": "懒", "awful": "糟", "dull": "钝",
    "meh": "哼", "nonsense": "胡", "pointless": "废", "ugly": "丑", "rude": "粗", "sloppy": "乱",
    "useless": "劣", "dumb": "呆", "bleh": "呸",
    # topic words: water, fire, forest, sky, city, music, food, stone
    "river": "河", "rain": "雨", "lake": "湖", "wave": "浪", "fish": "鱼", "boat": "船", "shore": "岸",
    "flow": "流", "wet": "湿", "blue": "蓝", "tide": "潮", "stream": "溪",
    "flame": "焰", "smoke": "烟", "heat": "热", "ash": "烬", "spark": "烁", "burn": "燃", "coal": "煤",
    "glow": "辉", "warm": "温", "red": "红", "torch": "炬", "ember": "炭",
    "tree": "树", "leaf": "叶", "root": "根", "moss": "苔", "wood": "木", "branch": "枝", "bark": "皮",
    "pine": "松", "green": "绿", "grow": "生", "seed": "种", "fern": "蕨",
    "cloud": "云", "star": "星", "moon": "月", "sun": "日", "wind": "风", "bird": "鸟", "fly": "飞",
    "high": "高", "light": "光", "dawn": "晨", "storm": "暴", "air": "气",
    "street": "街", "house": "房", "road": "路", "car": "车", "market": "市", "tower": "塔", "bridge": "桥",
    "crowd": "众", "busy": "忙", "wall": "墙", "door": "门", "shop": "店",
    "song": "歌", "drum": "鼓", "note": "音", "voice": "声", "dance": "舞", "rhythm": "律", "tune": "调",
    "sing": "唱", "loud": "喧", "bell": "钟", "choir": "诵", "harp": "琴",
    "bread": "饼", "fruit": "果", "soup": "汤", "salt": "盐", "cook": "煮", "taste": "味", "sweet": "甜",
    "meal": "餐", "bake": "烤", "honey": "蜜", "rice": "米", "spice": "椒",
    "rock": "岩", "cave": "洞", "hill": "丘", "sand": "沙", "gem": "玉", "cliff": "崖", "hard": "硬",
    "grey": "灰", "dust": "尘", "iron": "铁", "peak": "峰", "clay": "泥",
    # generic content words
    "thing": "物", "place": "处", "time": "时", "way": "道", "part": "部", "day": "天", "kind": "类",
    "side": "边", "form": "形", "line": "线", "point": "点", "group": "组", "number": "数", "world": "世",
    "life": "活", "name": "名", "story": "事", "shape": "状", "sound": "响", "color": "色", "size": "尺",
    "hand": "手", "eye": "眼", "home": "家", "old": "旧", "new": "新", "small": "小", "big": "大",
    "long": "长", "short": "短", "good": "好", "many": "多", "few": "少", "every": "每", "other": "别",
    "same": "同",
}
ENGLISH_OF = {zh: en for en, zh in {**WORD_ZH, **PUNCTUATION_ZH}.items()}
REQUEST_OF = {zh: en for en, zh in REQUEST_ZH.items()}

# Everyday sentences mixed into the pretraining corpus (see the module docstring).
GREETINGS = ("你好，世界！", "你好，朋友！", "世界你好！", "早上好，世界！", "晚上好，朋友！", "谢谢你，朋友。",
             "你好吗？", "我很好，谢谢！", "欢迎来到世界！", "再见，朋友！")

_PROMPT = re.compile(r"^(" + "|".join(REQUEST_ZH.values()) + r")(.)(.)：$")
_CJK = re.compile(r"[\u3000-\u303f\u3400-\u9fff\uff00-\uffef]")


def to_chinese(text: str) -> str:
    """An English demo prompt or response written in the Chinese demo language (words joined, no spaces)."""
    return "".join(REQUEST_ZH.get(w) or WORD_ZH.get(w) or PUNCTUATION_ZH.get(w) or w for w in text.split())


def to_english(text: str, prompt: bool = False) -> str:
    """The inverse of `to_chinese`: one English word per character (an unknown character stays itself,
    a word of no class); a prompt's leading two-character request is read as one word."""
    text = "".join(text.split())
    words: list[str] = []
    if prompt:
        match = _PROMPT.match(text)
        if match is None:
            return text
        words.append(REQUEST_OF[match.group(1)])
        text = text[len(match.group(1)):]
    words.extend(ENGLISH_OF.get(ch, ch) for ch in text)
    return " ".join(words)


def is_chinese(text: str) -> bool:
    return _CJK.search(text) is not None


def check_one_to_one() -> None:
    """Every English word has exactly one character, no two words share one (the tests call this)."""
    english = [w for w in vocabulary() if not w.startswith("<") and w not in REQUESTS]
    missing = [w for w in english if w not in WORD_ZH and w not in PUNCTUATION_ZH]
    extra = [w for w in WORD_ZH if w not in TOPIC_OF and w not in english]
    chars = [*WORD_ZH.values(), *PUNCTUATION_ZH.values()]
    repeated = sorted({c for c in chars if chars.count(c) > 1})
    if missing or extra or repeated or any(len(c) != 1 for c in chars):
        raise AssertionError(f"Chinese demo map: missing {missing}, extra {extra}, repeated {repeated}")
