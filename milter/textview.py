"""Turn an HTML body into the text a reader sees, the text hidden from them, and its links.

Detectors look for words, so the rendering follows what a browser shows rather than
what the markup says: `s<b></b>hit` is one word, `<td>a</td><td>b</td>` is two, and
text that is in the message but invisible (display:none, white on white, zero-size
font, ...) is kept apart in `hidden`, because hiding text is itself a spam and
filter-evasion signal.

`html_view` never raises: mail is hostile input and a crash here would let a message
through unscanned (or bounce it). When the tree cannot be built sensibly it falls back
to a crude tag-stripped rendering that over-reports rather than loses text.
"""

from __future__ import annotations

import functools
import html as htmllib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import tinycss2
import tinycss2.color3
from lxml import etree

__all__ = ["HtmlView", "Link", "html_view"]


@dataclass(frozen=True)
class Link:
    """One `<a href>` or `<area href>`: where it goes and what the reader sees on it."""

    href: str
    text: str


@dataclass(frozen=True)
class HtmlView:
    """The reader's view of an HTML body."""

    visible: str
    hidden: str
    links: tuple[Link, ...]


# Never rendered as body text. <iframe> content is a fallback no mail client shows.
_DROP = frozenset({"script", "style", "head", "title", "noscript", "template", "iframe"})
_BLOCK = frozenset(
    {
        "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol",
        "blockquote", "pre", "hr", "section", "article", "header", "footer", "nav", "address",
        "dd", "dt", "dl", "form", "fieldset", "figure", "figcaption", "main", "aside", "details",
        "summary", "center", "option", "caption", "body", "html", "legend", "menu", "dir",
        "hgroup", "listing", "xmp", "plaintext", "frameset", "noframes",
    }
)  # fmt: skip
_CELL = frozenset({"td", "th"})
_PRE = frozenset({"pre", "listing", "xmp", "plaintext", "textarea"})

_BLOCK_KIND, _CELL_KIND, _BR_KIND = 1, 2, 3
_TAG_KIND: dict[str, int] = {t: _BLOCK_KIND for t in _BLOCK} | {t: _CELL_KIND for t in _CELL}
_TAG_KIND["br"] = _BR_KIND
_DISPLAY_KIND: dict[str, int] = {"inline": 0, "block": _BLOCK_KIND, "cell": _CELL_KIND}

RGB = tuple[int, int, int]
_WHITE: RGB = (255, 255, 255)
_LINK_BLUE: RGB = (0, 0, 238)  # browsers colour links themselves; they do not inherit white text
_NEAR = 8  # per channel: #fefefe on #ffffff is as unreadable as #fff on #fff


class _Decl(NamedTuple):
    """The declarations of one style attribute or rule that matter for visibility; None = not set."""

    display: str | None = None  # "none", "inline", "block" or "cell"
    visibility: bool | None = None  # True = hidden; False = explicitly visible (overrides a parent)
    font_zero: bool | None = None  # True = zero size; False = an absolute non-zero size (overrides)
    veiled: bool | None = None  # opacity ~0, or zero height/width with overflow hidden
    color: tuple[int, int, int, float] | None = None
    bg: RGB | Literal["image"] | None = None  # "image": we cannot know what colour is behind the text


_NO_DECL = _Decl()
_SKIP_TOKENS = frozenset({"whitespace", "comment"})
_NUMERIC = frozenset({"number", "dimension", "percentage"})
_RELATIVE_UNITS = frozenset({"em", "ex", "ch", "cap", "ic", "lh"})
_IMAGE_FUNCTIONS = frozenset(
    {"url", "image", "image-set", "linear-gradient", "radial-gradient", "conic-gradient",
     "repeating-linear-gradient", "repeating-radial-gradient", "-webkit-linear-gradient"}
)  # fmt: skip
_INLINE_DISPLAYS = frozenset(
    {"inline", "inline-block", "inline-flex", "inline-grid", "inline-table", "contents", "ruby"}
)
_WATCHED = frozenset(
    {"display", "visibility", "font-size", "font", "opacity", "color", "background", "background-color",
     "background-image", "height", "max-height", "width", "max-width", "overflow", "overflow-x", "overflow-y"}
)  # fmt: skip


def _to_rgba(parsed: Any) -> tuple[int, int, int, float] | None:
    if isinstance(parsed, tuple) and len(parsed) == 4:
        r, g, b, a = (float(x) for x in parsed)
        return round(r * 255), round(g * 255), round(b * 255), a
    return None  # None or "currentColor"


def _token_color(token: Any) -> tuple[int, int, int, float] | None:
    return _to_rgba(tinycss2.color3.parse_color(token))


def _font_zero(token: Any) -> bool | None:
    if token.type in _NUMERIC:
        value = float(token.value)
        if value < 0:
            return None  # invalid, ignored by browsers
        if value == 0:
            return True
        if token.type == "percentage" or (token.type == "dimension" and token.lower_unit in _RELATIVE_UNITS):
            return None  # a multiple of the parent's size: zero stays zero
        # Sub-pixel text is as unreadable as zero, and an easy dodge of an `== 0` test.
        return token.type == "dimension" and token.lower_unit in ("px", "pt") and value < 1
    if token.type == "ident":
        if token.lower_value in ("inherit", "unset", "smaller", "larger", "revert"):
            return None
        return False  # small, medium, initial, ...
    return None  # calc() and friends: unknown, keep what the parent had


def _is_zero(token: Any) -> bool:
    return token.type in _NUMERIC and float(token.value) == 0


def _decl_from(declarations: Iterable[Any]) -> _Decl:
    display: str | None = None
    visibility: bool | None = None
    font_zero: bool | None = None
    veiled: bool | None = None
    color: tuple[int, int, int, float] | None = None
    bg: RGB | Literal["image"] | None = None
    zero_box = overflow_hidden = False
    for decl in declarations:
        if decl.type != "declaration":
            continue
        name = decl.lower_name
        if name not in _WATCHED:
            continue
        values = [t for t in decl.value if t.type not in _SKIP_TOKENS]
        if not values:
            continue
        first = values[0]
        ident = first.lower_value if first.type == "ident" else None
        if name == "display":
            if ident == "none":
                display = "none"
            elif ident == "table-cell":
                display = "cell"
            elif ident is not None:
                display = "inline" if ident in _INLINE_DISPLAYS else "block"
        elif name == "visibility":
            if ident in ("hidden", "collapse"):
                visibility = True
            elif ident == "visible":
                visibility = False
        elif name == "font-size":
            font_zero = _font_zero(first)
        elif name == "font":
            # Shorthand, e.g. the `font: 0/0 a` hiding idiom: the size is the first length, or a bare 0.
            for token in values:
                if token.type in ("dimension", "percentage") or (token.type == "number" and token.value == 0):
                    font_zero = _font_zero(token)
                    break
        elif name == "opacity":
            if first.type in ("number", "percentage"):
                scale = 100.0 if first.type == "percentage" else 1.0
                if float(first.value) / scale <= 0.05:
                    veiled = True
        elif name == "color":
            color = _token_color(first) if len(values) == 1 else None
        elif name == "background-color":
            rgba = _token_color(first) if len(values) == 1 else None
            if rgba is not None and rgba[3] > 0:
                bg = rgba[:3]
        elif name == "background":
            found: RGB | Literal["image"] | None = None
            for token in values:
                if token.type == "url" or (token.type == "function" and token.lower_name in _IMAGE_FUNCTIONS):
                    found = "image"
                    break
                rgba = _token_color(token) if token.type in ("hash", "ident", "function") else None
                if rgba is not None and rgba[3] > 0:
                    found = rgba[:3]
            bg = found
        elif name == "background-image":
            if ident != "none":
                bg = "image"
        elif name in ("height", "max-height", "width", "max-width"):
            zero_box = zero_box or _is_zero(first)
        elif ident in ("hidden", "clip"):  # overflow, overflow-x, overflow-y
            overflow_hidden = True
    if zero_box and overflow_hidden:
        veiled = True
    return _Decl(display, visibility, font_zero, veiled, color, bg)


_CACHE_LIMIT = 4096  # longer strings are parsed every time: a hostile message must not fill the caches


def _inline_style(text: str) -> _Decl | None:
    """The style attribute's effect, or None when it sets nothing we track (most of them)."""
    return _cached_inline_style(text) if len(text) <= _CACHE_LIMIT else _parse_inline_style(text)


def _parse_inline_style(text: str) -> _Decl | None:
    decl = _decl_from(tinycss2.parse_declaration_list(text, skip_comments=True, skip_whitespace=True))
    return None if decl == _NO_DECL else decl


# Newsletters repeat the same few style strings hundreds of times; parse each once.
_cached_inline_style = functools.lru_cache(maxsize=4096)(_parse_inline_style)


def _attr_color(value: str) -> RGB | None:
    """A legacy colour attribute (bgcolor, <font color>, <body text>)."""
    return _parse_attr_color(value) if len(value) <= 64 else None  # no colour is written that long


@functools.lru_cache(maxsize=1024)
def _parse_attr_color(value: str) -> RGB | None:
    value = value.strip()
    rgba = _to_rgba(tinycss2.color3.parse_color(value))
    if rgba is None and len(value) == 6 and all(c in "0123456789abcdefABCDEF" for c in value):
        rgba = _to_rgba(tinycss2.color3.parse_color("#" + value))  # browsers accept a missing '#'
    return None if rgba is None or rgba[3] == 0 else rgba[:3]


# A selector we understand on its own: `tag`, `.class`, `#id`, `tag.class`, `tag#id`.
_SIMPLE_SELECTOR = re.compile(r"([a-zA-Z][a-zA-Z0-9]*)?(?:([.#])(-?[_a-zA-Z][\w-]*))?")


def _merge(base: _Decl | None, over: _Decl) -> _Decl:
    if base is None:
        return over
    return _Decl._make(o if o is not None else b for b, o in zip(base, over, strict=True))


class _Sheet:
    """The rules of a message's <style> blocks that use plain tag/class/id selectors.

    Only what hides text, and backgrounds: a `.button{background:#c00}` rule is what makes
    the button's white text readable. Text colours from rules are left out, because without
    the full cascade a white-text rule would too often be judged against the wrong background.
    Only top-level rules count: rules inside @media are usually "hide on mobile", and the
    desktop reader still sees the text. Cascade order and specificity are ignored.
    """

    __slots__ = ("by_class", "by_id", "by_tag")

    def __init__(self) -> None:
        self.by_tag: dict[str, _Decl] = {}
        self.by_class: dict[str, list[tuple[str | None, _Decl]]] = {}
        self.by_id: dict[str, list[tuple[str | None, _Decl]]] = {}

    def __bool__(self) -> bool:
        return bool(self.by_tag or self.by_class or self.by_id)

    def add(self, selector: str, decl: _Decl) -> None:
        m = _SIMPLE_SELECTOR.fullmatch(selector.strip())
        if m is None or not (m.group(1) or m.group(2)):
            return
        tag = m.group(1).lower() if m.group(1) else None
        if m.group(2) is None:
            assert tag is not None
            self.by_tag[tag] = _merge(self.by_tag.get(tag), decl)
            return
        table = self.by_class if m.group(2) == "." else self.by_id
        table.setdefault(m.group(3), []).append((tag, decl))

    def match(self, el: etree._Element, tag: str) -> _Decl | None:
        found = self.by_tag.get(tag)
        if self.by_class:
            classes = el.get("class")
            if classes:
                for name in classes.split():
                    for want, decl in self.by_class.get(name, ()):
                        if want is None or want == tag:
                            found = _merge(found, decl)
        if self.by_id:
            ident = el.get("id")
            if ident:
                for want, decl in self.by_id.get(ident.strip(), ()):
                    if want is None or want == tag:
                        found = _merge(found, decl)
        return found


def _sheet(css: str) -> _Sheet:
    # A school's newsletters reuse one style sheet; cache it, but not a hostile megabyte of CSS.
    return _cached_sheet(css) if len(css) <= 16 * _CACHE_LIMIT else _parse_sheet(css)


def _parse_sheet(css: str) -> _Sheet:
    sheet = _Sheet()
    for rule in tinycss2.parse_stylesheet(css, skip_comments=True, skip_whitespace=True):
        if rule.type != "qualified-rule":
            continue
        decl = _decl_from(
            tinycss2.parse_declaration_list(rule.content, skip_comments=True, skip_whitespace=True)
        )
        kept = _Decl(
            display="none" if decl.display == "none" else None,
            visibility=True if decl.visibility else None,
            font_zero=True if decl.font_zero else None,
            veiled=decl.veiled,
            bg=decl.bg,
        )
        if kept == _NO_DECL:
            continue
        for selector in tinycss2.serialize(rule.prelude).split(","):
            sheet.add(selector, kept)
    return sheet


_cached_sheet = functools.lru_cache(maxsize=64)(_parse_sheet)


class _Ctx:
    """Rendering state inherited from ancestors (shared, never mutated after creation)."""

    __slots__ = ("bg", "color", "drop", "font_zero", "gone", "hidden", "pre", "veiled", "vis_hidden")

    def __init__(
        self,
        *,
        drop: bool = False,
        gone: bool = False,
        veiled: bool = False,
        vis_hidden: bool = False,
        font_zero: bool = False,
        color: tuple[int, int, int, float] = (0, 0, 0, 1.0),
        bg: RGB | None = _WHITE,
        pre: bool = False,
    ) -> None:
        self.drop = drop
        self.gone = gone  # display:none or `hidden`: no box at all, so no line break either
        self.veiled = veiled  # opacity or clipping: descendants cannot undo it
        self.vis_hidden = vis_hidden  # visibility: a descendant may set `visible` again
        self.font_zero = font_zero  # font-size: a descendant may set a real size again
        self.color = color
        self.bg = bg  # None: a background image, colour unknown
        self.pre = pre
        self.hidden = (
            gone
            or veiled
            or vis_hidden
            or font_zero
            or color[3] <= 0.05
            or (
                bg is not None
                and abs(color[0] - bg[0]) <= _NEAR
                and abs(color[1] - bg[1]) <= _NEAR
                and abs(color[2] - bg[2]) <= _NEAR
            )
        )


_ROOT = _Ctx()


class _Out:
    """Accumulates one text stream, collapsing whitespace the way a browser lays it out."""

    __slots__ = ("had_pre", "nl", "parts", "space")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.nl = 2  # newlines at the end of the output; 2 at the start so leading breaks vanish
        self.space = False  # collapsed whitespace waiting for the next word
        self.had_pre = False

    def text(self, s: str) -> None:
        words = s.split()
        if not words:
            self.space = True
            return
        if (self.space or s[0].isspace()) and self.nl == 0:
            self.parts.append(" ")
        self.parts.append(" ".join(words))
        self.nl = 0
        self.space = s[-1].isspace()

    def pre_text(self, s: str) -> None:
        self.had_pre = True
        if self.space and self.nl == 0 and not s[0].isspace():
            self.parts.append(" ")
        self.parts.append(s)
        body = s.rstrip("\n")
        self.nl = min(2, self.nl + len(s)) if not body else min(2, len(s) - len(body))
        self.space = False

    def block(self) -> None:
        if self.nl == 0:
            self.parts.append("\n")
            self.nl = 1
        self.space = False

    def br(self) -> None:
        if self.nl < 2:
            self.parts.append("\n")
            self.nl += 1
        self.space = False

    def result(self, start: int = 0) -> str:
        return _finish("".join(self.parts[start:]), self.had_pre)


_BLANK_LINES = re.compile(r"\n[^\S\n]*\n(?:[^\S\n]*\n)+")


def _finish(text: str, had_pre: bool = True) -> str:
    text = text.strip()
    # Only <pre> can put more than one blank line in a row into the stream.
    return _BLANK_LINES.sub("\n\n", text) if had_pre and "\n\n" in text else text


# Attributes and tags that can change what the subtree looks like; most elements have none.
_STATE_ATTRS = frozenset({"style", "hidden", "bgcolor", "background", "color", "text", "href", "class", "id"})
_STATE_TAGS = _DROP | _PRE


# An element's state depends only on its parent's state and on these few attributes; within
# one document the same combinations recur (every <p style="..."> of a newsletter, every
# link), so each is worked out once per render. Keys hold the parent state by identity.
_Memo = dict[tuple[object, ...], tuple[_Ctx, str | None]]


def _enter(
    parent: _Ctx, el: etree._Element, tag: str, sheet: _Sheet | None, memo: _Memo
) -> tuple[_Ctx, str | None]:
    """The state for `el` and its CSS display override; `parent` itself when nothing changes."""
    keys = el.keys()
    if (
        (not keys or _STATE_ATTRS.isdisjoint(keys))
        and tag not in _STATE_TAGS
        and (sheet is None or tag not in sheet.by_tag)
    ):
        return parent, None
    # Most of these attributes are absent: a look in `keys` is cheaper than asking lxml.
    style = el.get("style") if "style" in keys else None
    hidden_attr = "hidden" in keys
    bgcolor = el.get("bgcolor") if "bgcolor" in keys else None
    bg_image = el.get("background") if "background" in keys else None
    color_attr = el.get("color") if tag == "font" else el.get("text") if tag == "body" else None
    is_link = tag == "a" and "href" in keys
    # Style sheet rules select by tag, class and id.
    selected = (el.get("class"), el.get("id")) if sheet is not None else None
    key = (parent, tag, style, hidden_attr, bgcolor, bg_image, color_attr, is_link, selected)
    found = memo.get(key)
    if found is None:
        found = memo[key] = _derive(
            parent, el, tag, sheet, style, hidden_attr, bgcolor, bg_image, color_attr, is_link
        )
    return found


def _derive(
    parent: _Ctx,
    el: etree._Element,
    tag: str,
    sheet: _Sheet | None,
    style: str | None,
    hidden_attr: bool,
    bgcolor: str | None,
    bg_image: str | None,
    color_attr: str | None,
    is_link: bool,
) -> tuple[_Ctx, str | None]:
    """What `_enter` returns, worked out from the attributes it read."""
    decl = _inline_style(style) if style else None
    if sheet is not None:
        from_sheet = sheet.match(el, tag)
        if from_sheet is not None:
            decl = from_sheet if decl is None else _merge(from_sheet, decl)
    if (
        decl is None
        and not hidden_attr
        and bgcolor is None
        and bg_image is None
        and color_attr is None
        and not is_link
        and tag not in _DROP
        and tag not in _PRE
    ):
        return parent, None
    d = decl or _NO_DECL
    color = parent.color
    if is_link:
        color = (*_LINK_BLUE, 1.0)
    if color_attr is not None:
        rgb = _attr_color(color_attr)
        if rgb is not None:
            color = (*rgb, 1.0)
    if d.color is not None:
        color = d.color

    bg = parent.bg
    if bgcolor is not None:
        rgb = _attr_color(bgcolor)
        if rgb is not None:
            bg = rgb
    if bg_image is not None and bg_image.strip():
        bg = None
    if d.bg is not None:
        bg = None if d.bg == "image" else d.bg

    ctx = _Ctx(
        drop=parent.drop or tag in _DROP,
        gone=parent.gone or hidden_attr or d.display == "none",
        veiled=parent.veiled or bool(d.veiled),
        vis_hidden=parent.vis_hidden if d.visibility is None else d.visibility,
        font_zero=parent.font_zero if d.font_zero is None else d.font_zero,
        color=color,
        bg=bg,
        pre=parent.pre or tag in _PRE,
    )
    return ctx, d.display


# Parsing stops dead at libxml2's nesting limit (2048 even with huge_tree): everything after
# is lost. So a message nested that deep is re-parsed with the excess tags removed.
_MAX_DEPTH = 1000
# Unterminated comments and tags run to the end, as in a browser, and keep matching linear.
_TAG_TOKEN = re.compile(r"<!--.*?(?:-->|\Z)|<(/?)([a-zA-Z][^\s/>]*)[^>]*+>?", re.S)
_VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
     "track", "wbr", "keygen", "basefont", "frame"}
)  # fmt: skip
# libxml2 drops everything after </html>; browsers keep rendering it into the body.
_END_OF_DOCUMENT = re.compile(r"</(?:html|body)\b[^>]*+>?", re.I)
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
# The same characters for str.translate, which deletes from ASCII text at memory speed; the
# regex tests every character against a character set, four times slower. (On non-ASCII
# text translate takes a slow path, so the regex stays for that.)
_DELETE_CONTROLS = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F])


def _flatten(markup: str) -> str:
    """Drop the start and end tags of elements nested deeper than _MAX_DEPTH, keeping their text."""
    stack: list[tuple[str, bool]] = []

    def replace(m: re.Match[str]) -> str:
        whole = m.group(0)
        if m.group(2) is None:
            return whole  # comment
        name = m.group(2).lower()
        if m.group(1):
            # Look only near the top: a stray end tag must not cost a scan of a deep stack.
            for i in range(len(stack) - 1, max(-1, len(stack) - 65), -1):
                if stack[i][0] == name:
                    kept = stack[i][1]
                    del stack[i:]
                    return whole if kept else ""
            return whole
        if name in _VOID or whole.endswith("/>"):
            return whole
        kept = len(stack) < _MAX_DEPTH
        stack.append((name, kept))
        return whole if kept else ""

    return _TAG_TOKEN.sub(replace, markup)


def _parse(markup: str) -> etree._Element | None:
    # Bytes with a forced encoding: lxml refuses a str carrying an XML encoding declaration,
    # and a <meta charset> must not re-decode text that is already decoded.
    data = markup.encode("utf-8", "replace")
    parser = etree.HTMLParser(encoding="utf-8", huge_tree=True, remove_pis=True)
    root = etree.fromstring(data, parser)
    if any(e.type == etree.ErrorTypes.ERR_RESOURCE_LIMIT for e in parser.error_log):
        parser = etree.HTMLParser(encoding="utf-8", huge_tree=True, remove_pis=True)
        root = etree.fromstring(_flatten(markup).encode("utf-8", "replace"), parser)
    return root


# What is needed when an element closes: its state, its kind (block/cell/0), its index in the
# link list (-1 if not a link) and where its text starts in the visible stream.
_Frame = tuple[_Ctx, int, int, int]


def _render(root: etree._Element) -> HtmlView:
    css = "\n".join(s.text for s in root.iter("style") if s.text)
    sheet = _sheet(css) if css else None
    if not sheet:
        sheet = None

    vis, hid = _Out(), _Out()
    hrefs: list[str] = []
    link_texts: list[str] = []  # filled in when the link's element closes
    memo: _Memo = {}

    def emit(ctx: _Ctx, text: str, first_in_pre: bool = False) -> None:
        if ctx.drop:
            return
        if ctx.pre:
            out = hid if ctx.hidden else vis
            if first_in_pre and text.startswith("\n"):
                text = text[1:]  # browsers ignore the newline straight after <pre>
            if text:
                out.pre_text(text)
            if out is vis:
                hid.space = True  # visible text between two hidden fragments keeps them apart
        elif ctx.hidden:
            hid.text(text)
        else:
            vis.text(text)
            hid.space = True

    def boundary(ctx: _Ctx, kind: int) -> None:
        if ctx.drop:
            return
        if kind == _BLOCK_KIND:
            hid.block()
            if not ctx.gone:
                vis.block()
        elif kind == _CELL_KIND:
            hid.space = True
            if not ctx.gone:
                vis.space = True
        else:  # <br>: an invisible line break still breaks the visible line
            hid.block()
            if not ctx.gone:
                vis.br()

    # (element, parent's state, None) to enter; (element, parent's state, frame) to leave.
    # An explicit stack: documents can nest thousands deep, beyond Python's recursion limit.
    stack: list[tuple[etree._Element, _Ctx, _Frame | None]] = [(root, _ROOT, None)]
    while stack:
        el, parent, frame = stack.pop()
        if frame is None:
            tag = el.tag
            if not isinstance(tag, str):  # comment or processing instruction: only its tail shows
                tail = el.tail
                if tail:
                    emit(parent, tail)
                continue
            ctx, display = _enter(parent, el, tag, sheet, memo)
            kind = _TAG_KIND.get(tag, 0)
            if display in _DISPLAY_KIND and kind != _BR_KIND:
                kind = _DISPLAY_KIND[display]
            if kind:
                boundary(ctx, kind)
            link_index = link_start = -1
            if tag in ("a", "area"):
                href = el.get("href")
                if href is not None:
                    link_index, link_start = len(hrefs), len(vis.parts)
                    hrefs.append(href.strip())
                    link_texts.append("")
            if tag == "img":
                alt = el.get("alt")
                if alt:
                    emit(ctx, alt)
            text = el.text
            if text:
                emit(ctx, text, first_in_pre=tag in _PRE)
            frame = (ctx, kind if kind != _BR_KIND else 0, link_index, link_start)
            if len(el):
                stack.append((el, parent, frame))
                stack.extend([(child, ctx, None) for child in reversed(el)])
                continue
            # Most elements are leaves: leave them at once rather than by a trip through the stack.
        ctx, kind, link_index, link_start = frame
        if kind:
            boundary(ctx, kind)
        if link_index >= 0:
            link_texts[link_index] = vis.result(link_start)
        tail = el.tail
        if tail:
            emit(parent, tail)

    return HtmlView(
        visible=vis.result(),
        hidden=hid.result(),
        links=tuple(Link(href, text) for href, text in zip(hrefs, link_texts, strict=True)),
    )


_CRUDE_DROP = re.compile(
    r"<(script|style|head|title|template)\b.*?(?:</\1\s*>|\Z)|<!--.*?(?:-->|\Z)", re.S | re.I
)
_CRUDE_BLOCK = re.compile(r"</?(?:p|div|br|li|tr|h[1-6]|table|blockquote|pre|hr)\b[^>]*+>?", re.I)
_CRUDE_TAG = re.compile(r"<[a-zA-Z/!?][^>]*+>?")
_CRUDE_HREF = re.compile(
    r"<(?:a|area)\b[^<>]{0,2000}?\bhref\s*=\s*(?:\"([^\"]*)\"|'([^']*)'|([^\s>]+))", re.I
)


def _crude(markup: str) -> HtmlView:
    """Last resort when the parser fails: every piece of text counts as visible."""
    text = _CRUDE_TAG.sub("", _CRUDE_BLOCK.sub("\n", _CRUDE_DROP.sub("", markup)))
    lines = (" ".join(line.split()) for line in htmllib.unescape(text).splitlines())
    links = tuple(
        Link(htmllib.unescape(next(g for g in m.groups() if g is not None)).strip(), "")
        for m in _CRUDE_HREF.finditer(markup)
    )
    return HtmlView(visible=_finish("\n".join(line for line in lines if line)), hidden="", links=links)


def html_view(html: str) -> HtmlView:
    """Split an HTML document into the text a reader sees, the text hidden from them, and its links."""
    # Browsers drop NULs and render other control characters as nothing: `f\0uck` reads `fuck`.
    html = html.translate(_DELETE_CONTROLS) if html.isascii() else _CONTROLS.sub("", html)
    markup = _END_OF_DOCUMENT.sub("", html)
    try:
        root = _parse(markup)
        if root is None:  # empty, whitespace, or only comments
            return HtmlView(visible="", hidden="", links=())
        return _render(root)
    except Exception:  # a parser or tree oddity must not stop the message being scanned
        return _crude(markup)
