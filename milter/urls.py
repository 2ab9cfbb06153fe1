"""URLs in mail: find them in text, take their hosts apart, and spot links whose text lies about them.

Host form. Every host this module returns is in one canonical form: lowercase,
ASCII-compatible (IDN labels as punycode "xn--" A-labels), no trailing dot, no
port, no userinfo; IP addresses in their standard text form (IPv6 without
brackets). ASCII is the form DNS and blocklist feeds use, so a host compares
equal to a list entry byte for byte whichever way either was written, and it
shows a homoglyph spoof plainly to a reviewer ("xn--pypal-4ve.com", not a
"pаypal.com" that looks like the real thing).

IDN handling follows UTS #46 non-transitional processing (the `idna` package),
which is what current browsers do, so "faß.de" is "xn--fa-hia.de", not "fass.de".
Where IDNA 2008 refuses a label that browsers still resolve (emoji domains),
the standard library's IDNA 2003 codec is the fallback, applied the same way to
both spellings so they still meet.

Registrable domains (eTLD+1) come from the Public Suffix List shipped inside the
`publicsuffixlist` package, read once and never downloaded. Its private section
(github.io, blogspot.com, ...) is included: sites under those suffixes belong to
different people, which is what matters when asking "is this link going
somewhere other than where its text says?".
"""

from __future__ import annotations

import functools
import ipaddress
import re
from urllib.parse import unquote

import idna
from publicsuffixlist import PublicSuffixList

__all__ = [
    "deceptive_link",
    "extract_urls",
    "icann_public_suffix",
    "normalize_host",
    "registrable_domain",
    "url_host",
]

# --- extraction -------------------------------------------------------------

# One pass over the text for http://, https://, ftp:// and www. in any case.
# It starts with a plain character class so the regex engine can skip quickly
# to candidate letters (about twice as fast as a case-insensitive alternation);
# the look-behinds then tie the rest to that letter and stop "awww.x" or
# "user@www.x" from starting a URL. The body runs to whitespace or a character
# that cannot be in a URL written in prose (quotes and angle brackets delimit
# URLs in text; zero-width spaces and BOMs are separators that \s misses).
_URL_RE = re.compile(
    r"[hHfFwW](?<![\w@.+/-].)"
    r"(?:(?<=[hH])(?i:ttps?://)|(?<=[fF])(?i:tp://)|(?<=[wW])(?i:ww\.))"
    r"""[^\s<>"`\x00-\x1f\x7f\u200b\u2060\ufeff]+"""
)
# Punctuation that ends a sentence rather than a URL, including CJK and typographic forms.
_TRAILING = frozenset(".,;:!?'\"…“”‘’«»。，、；：！？」』】》")
# A closing bracket is kept only when it balances an opening one inside the
# URL, so "https://en.wikipedia.org/wiki/Foo_(bar)" keeps its ")" but
# "(see https://example.com)" loses it.
_PAIRS = {")": "(", "]": "[", "}": "{"}


def _trim_url(url: str) -> str:
    # Walks an end index back, with bracket counts taken once, so a hostile
    # "http://x)))))...)" of any length costs linear time, not quadratic.
    end = len(url)
    unmatched = {close: url.count(close) - url.count(open_) for close, open_ in _PAIRS.items()}
    while end:
        last = url[end - 1]
        if last in _TRAILING:
            end -= 1
        elif unmatched.get(last, 0) > 0:
            unmatched[last] -= 1
            end -= 1
        else:
            break
    return url[:end]


def extract_urls(text: str) -> list[str]:
    """URLs written in plain text: http, https and ftp URLs and bare "www." hosts.

    Sentence punctuation, unbalanced closing brackets and quotes after a URL
    are not part of it. Each URL is returned once, in order of first
    appearance, exactly as written (a bare "www.x" stays bare; url_host() reads it).
    """
    # Every match holds "://" or, in any case, "www.": most text has neither, and these two
    # substring tests are much cheaper than the regex trying every h, f and w of the text.
    if "://" not in text and "www." not in text.lower():
        return []
    found: dict[str, None] = {}  # a dict keeps first-seen order and drops repeats
    for match in _URL_RE.finditer(text):
        url = _trim_url(match.group())
        # Nothing left after the scheme or "www." means it was just the prefix.
        prefix = url.find("//") + 2 if url[:1] in "hHfF" else 4
        if len(url) > prefix and url not in found:
            found[url] = None
    return list(found)


# --- hosts ------------------------------------------------------------------

# Schemes whose URLs name a host that a click or a fetch goes to. Anything
# else (mailto:, tel:, javascript:, data:, cid:, file:, ...) has no web host.
_WEB_SCHEMES = frozenset({"http", "https", "ftp", "ftps", "ws", "wss"})
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
# Browsers treat a backslash like a slash in web URLs, so it ends the authority
# too: "http://evil.example\@paypal.com" goes to evil.example.
_AUTHORITY_END_RE = re.compile(r"[/\\?#]")
# A bare "host[:port][/path...]" with no scheme, such as link text "paypal.com/login".
_BARE_RE = re.compile(r"([^/\\?#@:\s]+)(?::([0-9]*))?(?:[/\\?#].*)?", re.DOTALL)
_ASCII_LABEL_RE = re.compile(r"[a-z0-9_-]{1,63}")  # underscores occur in real DNS names
_TLD_RE = re.compile(r"[a-z](?:[a-z0-9-]*[a-z0-9])?")  # top-level domains are stricter
_DOTTED_QUAD_RE = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
# Reserved names (RFC 2606, RFC 6761) that are not in the Public Suffix List
# but are fine in examples and tests; other unknown endings are not hosts.
_RESERVED_TLDS = frozenset({"example", "test", "invalid", "localhost"})
_REMOVED_ANYWHERE = str.maketrans("", "", "\t\r\n")  # browsers drop these inside URLs
_C0_AND_SPACE = "".join(chr(i) for i in range(0x21))  # browsers strip these from both ends
_IPV4_DIGITS = {10: re.compile("[0-9]+"), 8: re.compile("[0-7]+"), 16: re.compile("[0-9a-fA-F]+")}


@functools.cache
def _psl() -> PublicSuffixList:
    """The full Public Suffix List (ICANN and private sections), parsed once."""
    return PublicSuffixList()


@functools.cache
def _icann_psl() -> PublicSuffixList:
    """The ICANN section only: suffixes that are registries, not companies' domains."""
    return PublicSuffixList(only_icann=True)


def preload() -> None:
    """Parse the suffix lists now (about 60 ms) rather than in the first message with a
    link: the daemon calls this before forking its workers, which then share them."""
    _psl()
    _icann_psl()


def _ipv4_number(part: str) -> int | None:
    """One part of a browser-style IPv4 address: decimal, 0x hex or 0-led octal."""
    radix = 10
    if part[:2] in ("0x", "0X"):
        part, radix = part[2:], 16
    elif len(part) > 1 and part[0] == "0":
        part, radix = part[1:], 8
    if not part:
        return 0
    # Checked here because int() would also take "1_0", " 1" and non-ASCII digits.
    return int(part, radix) if _IPV4_DIGITS[radix].fullmatch(part) else None


def _ends_in_number(labels: list[str]) -> bool:
    last = labels[-1]
    if last.isascii() and last.isdigit():
        return True
    return last[:2] in ("0x", "0X") and _ipv4_number(last) is not None


def _parse_ipv4(labels: list[str]) -> str | None:
    """IPv4 as browsers parse it, so "http://3232235777/" and "http://0xc0.168.1.1/" are 192.168.1.1.

    Phishers use these spellings to hide an address; reporting the plain form
    lets an IP blocklist and a reviewer see it.
    """
    if len(labels) > 4 or "" in labels:
        return None
    numbers = [_ipv4_number(label) for label in labels]
    if any(n is None for n in numbers):
        return None
    ints = [n for n in numbers if n is not None]
    if any(n > 255 for n in ints[:-1]) or ints[-1] >= 256 ** (5 - len(ints)):
        return None
    value = ints[-1] + sum(n * 256 ** (3 - i) for i, n in enumerate(ints[:-1]))
    return str(ipaddress.IPv4Address(value))


def _canonical_alabel(label: str) -> str | None:
    """An "xn--" label decoded and re-encoded, so only valid punycode passes, in one spelling."""
    try:
        return idna.alabel(idna.ulabel(label)).decode("ascii")
    except idna.IDNAError:
        pass
    try:  # IDNA 2003 fallback, e.g. emoji labels that browsers still resolve
        return label.encode("ascii").decode("idna").encode("idna").decode("ascii")
    except UnicodeError:
        return None


def _to_alabel(label: str) -> str | None:
    """A Unicode label as its "xn--" A-label (same fallback as _canonical_alabel)."""
    try:
        return idna.alabel(label).decode("ascii")
    except idna.IDNAError:
        pass
    try:
        return label.encode("idna").decode("ascii")
    except UnicodeError:
        return None


def _normalize(host: str) -> str | None:
    host = host.strip()
    if ":" in host:  # only IPv6 literals have colons once the port is gone
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            return ipaddress.IPv6Address(host).compressed  # rejects zone ids ("%eth0") too
        except ValueError:
            return None
    if not host.isascii():
        # UTS #46 mapping: case folding, full-width letters, and the ideographic
        # full stop "。" that browsers read as a dot.
        host = idna.uts46_remap(host, std3_rules=False, transitional=False)
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]
    labels = host.split(".")
    if not host or "" in labels:
        return None
    if _ends_in_number(labels):
        return _parse_ipv4(labels)
    out: list[str] = []
    for label in labels:
        canonical: str | None = label
        if not label.isascii():
            canonical = _to_alabel(label)
        elif not _ASCII_LABEL_RE.fullmatch(label):
            return None
        elif label.startswith("xn--"):
            canonical = _canonical_alabel(label)
        if canonical is None:
            return None
        out.append(canonical)
    result = ".".join(out)
    return result if len(result) <= 253 and _TLD_RE.fullmatch(out[-1]) else None


def normalize_host(host: str) -> str | None:
    """A host name or IP address in this module's canonical form (see the module docstring).

    None when it is not a valid host. Never raises.
    """
    try:
        return _normalize(host)
    except (ValueError, UnicodeError):  # idna.IDNAError is a UnicodeError
        return None


def _is_ip(host: str) -> bool:
    """For canonical hosts: only IPs have a colon or an all-digit last label (others became IPs)."""
    return ":" in host or host.rpartition(".")[2].isdigit()


def _valid_port(port: str | None) -> bool:
    return not port or (port.isascii() and port.isdigit() and int(port) <= 65535)


def _authority_host(rest: str) -> str | None:
    """The host of "[userinfo@]host[:port][/...]"."""
    end = _AUTHORITY_END_RE.search(rest)
    authority = rest[: end.start()] if end else rest
    # The last "@" ends the userinfo, as browsers read it:
    # "http://paypal.com@evil.example/" goes to evil.example.
    authority = authority.rpartition("@")[2]
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            return None
        host, after = authority[: close + 1], authority[close + 1 :]
        if after and (after[0] != ":" or not _valid_port(after[1:])):
            return None
    else:
        host, colon, port = authority.partition(":")
        if colon and not _valid_port(port):
            return None
    if "%" in host:  # browsers percent-decode hosts: "%65vil.example" is evil.example
        host = unquote(host, errors="strict")
    return normalize_host(host) if host else None


def _bare_host(text: str) -> str | None:
    """The host of a scheme-less "host[:port][/path]", or None if it is more likely a relative link."""
    match = _BARE_RE.fullmatch(text)
    if not match or not _valid_port(match.group(2)):
        return None
    written = match.group(1)
    host = normalize_host(written)
    if host is None or "." not in host:
        return None
    if _is_ip(host):
        # Only a plain dotted quad: bare "1.2" or "3.11.7" is a version number, not an address.
        return host if _DOTTED_QUAD_RE.fullmatch(written) else None
    # "www." says host; otherwise the ending must be a real top-level domain,
    # so "logo.png" and "index.html" stay relative links.
    if host.startswith("www.") or host.rpartition(".")[2] in _RESERVED_TLDS:
        return host
    return host if _psl().publicsuffix(host, accept_unknown=False) is not None else None


def _url_host(url: str) -> str | None:
    text = url.strip(_C0_AND_SPACE).translate(_REMOVED_ANYWHERE)
    scheme = _SCHEME_RE.match(text)
    if scheme:
        name = scheme.group()[:-1].lower()
        if name in _WEB_SCHEMES:
            # Browsers skip any run of slashes or backslashes here ("http:/x", "http:\\x").
            return _authority_host(text[scheme.end() :].lstrip("/\\"))
        if "." not in name:
            return None  # mailto:, tel:, javascript:, data:, cid:, ...
        # "www.example.com:8080/x" only looks like a scheme; read it as a bare host.
    if text.startswith("//"):  # scheme-relative: still names a host
        return _authority_host(text[2:])
    return _bare_host(text)


def url_host(url: str) -> str | None:
    """The canonical host of a URL, of a bare "www.x.y/..." or "x.com/...", or of a bare host.

    None for links without a web host (mailto:, tel:, javascript:, data:,
    cid:, ...), for relative links and for garbage. Never raises.
    """
    try:
        return _url_host(url)
    except (ValueError, UnicodeError):
        return None


# --- domains ----------------------------------------------------------------


def registrable_domain(host: str) -> str | None:
    """The registrable domain (eTLD+1) of a host: "a.b.example.co.uk" -> "example.co.uk".

    An IP address is its own answer. None for a bare public suffix ("co.uk",
    "github.io") and for anything that is not a host.
    """
    normal = normalize_host(host)
    if normal is None:
        return None
    if _is_ip(normal):
        return normal
    return _psl().privatesuffix(normal)


def icann_public_suffix(host: str) -> bool:
    """Whether a canonical host is itself a registry-level public suffix ("com", "co.uk", "beds.sch.uk").

    Uses only the ICANN section: "github.io" is a company's domain, not a registry's.
    """
    return bool(_icann_psl().is_public(host))


# --- deceptive links ----------------------------------------------------------

# Real top-level domains that are also everyday file extensions: link text
# "notes.zip" or "README.md" is a file name, not a claim about where the link goes.
_FILE_LIKE_TLDS = frozenset({"zip", "mov", "md"})
# What may surround a domain in link text: brackets, quotes, sentence punctuation.
_TEXT_EDGES = "()[]{}<>\"'“”‘’«».,;:!?… \t\r\n\u00a0"


def _shown_host(text: str) -> str | None:
    """The host the link text presents as the destination, if it presents one."""
    urls = extract_urls(text)
    if urls:
        return url_host(urls[0])
    token = text.strip(_TEXT_EDGES)
    if not token or any(ch.isspace() for ch in token):
        return None  # words, not an address
    host = url_host(token)
    if host is None:
        return None
    written_as_address = "/" in token or token.lower().startswith("www.")
    if not written_as_address and host.rpartition(".")[2] in _FILE_LIKE_TLDS:
        return None
    return host


def deceptive_link(href: str, text: str) -> tuple[str, str] | None:
    """(shown_domain, actual_domain) when link text shows one site and the link goes to another.

    Compared by registrable domain, so "www.bbc.co.uk" shown over a link to
    "https://news.bbc.co.uk/x" is fine, as is http against https. Text that
    is not an address ("click here") is never deceptive. None too when the
    href has no web host (mailto:, relative links, ...).
    """
    # The text is checked first: most link text is words, and that settles it cheaply.
    if "." not in text:
        return None
    shown_host = _shown_host(text)
    if shown_host is None:
        return None
    actual_host = url_host(href)
    if actual_host is None:
        return None
    shown = registrable_domain(shown_host) or shown_host
    actual = registrable_domain(actual_host) or actual_host
    return None if shown == actual else (shown, actual)
