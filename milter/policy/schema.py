"""The shape of rules/policy.yaml, validated with pydantic so every mistake gets a reason."""

from __future__ import annotations

import enum
from ipaddress import IPv4Network, IPv6Network
from typing import Annotated, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator, model_validator

from milter.findings import Severity


class Direction(enum.StrEnum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"
    INTERNAL = "internal"


class Role(enum.StrEnum):
    STAFF = "staff"
    STUDENT = "student"
    PARENT = "parent"
    EXTERNAL = "external"


class Action(enum.StrEnum):
    """What happens to a message. Values are ordered by precedence in PRECEDENCE below."""

    ACCEPT = "accept"
    TAG = "tag"
    FIX = "fix"
    TEMPFAIL = "tempfail"
    QUARANTINE = "quarantine"
    DISCARD = "discard"
    REJECT = "reject"


# When findings ask for different actions, the strongest wins. Reject beats quarantine:
# refusing at SMTP time keeps the message with the sender, who is told why.
PRECEDENCE: dict[Action, int] = {a: i for i, a in enumerate(Action)}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class School(Strict):
    name: str
    # Mail domain -> the role of an address in it that the directory does not list.
    domains: dict[str, Role] = Field(min_length=1)
    trusted_networks: list[IPv4Network | IPv6Network] = []
    directory: str | None = None
    report_address: str | None = None
    review_address: str | None = None
    # Role name (it, dsl, slt, ...) -> address alerts go to.
    contacts: dict[str, str] = {}

    @field_validator("domains")
    @classmethod
    def _lower_domains(cls, v: dict[str, Role]) -> dict[str, Role]:
        for domain in v:
            if "." not in domain or "@" in domain or " " in domain:
                raise ValueError(f"{domain!r} is not a mail domain")
        return {d.lower().strip("."): r for d, r in v.items()}


class ObsceneLanguage(Strict):
    enabled: bool = True
    clause: str = "5.5"
    # Offensive mail received from outside is a 5.7 matter: report it so it can be blocked.
    clause_received: str = "5.7"
    lexicon: str = "lexicon/obscene.tsv"
    allowlist: list[str] = ["lexicon/allowlist.txt"]
    # Words found only in text a reader cannot see count as a finding too, at this severity or above.
    scan_hidden_text: bool = True


class SafeguardingConcern(Strict):
    enabled: bool = True
    # Keeping Children Safe in Education, the statutory guidance the DSL works under;
    # bullying also falls under clause 6.15.
    clause: str = "KCSIE"
    category_clauses: dict[str, str] = {"bullying": "6.15"}
    lexicon: str = "lexicon/safeguarding.tsv"
    # How many words either side of a match are searched for an exclusion context.
    context_words: int = Field(default=8, ge=0, le=50)


class OffensiveLinks(Strict):
    enabled: bool = True
    clause: str = "5.5"
    domain_lists: str = "domains"
    deceptive_links: bool = True
    # Severity of a link by the list it is on; lists not named here are strong.
    severity: dict[str, Severity] = {"malware": Severity.SEVERE, "adult": Severity.SEVERE}

    @field_validator("severity", mode="before")
    @classmethod
    def _severities(cls, v: object) -> object:
        if isinstance(v, dict):
            return {k: Severity.parse(x) if isinstance(x, str) else x for k, x in v.items()}
        return v


class MissingBcc(Strict):
    enabled: bool = True
    clause: str = "appendix"
    # More visible parent addresses than this in To/Cc is a finding.
    max_visible_parents: int = Field(default=2, ge=0)
    # With no directory, external addresses stand in for parents.
    max_visible_external: int = Field(default=2, ge=0)


class BulkWeight(Strict):
    enabled: bool = True
    clause: str = "1.2"
    # Message size times envelope recipients: the appendix's 5 MB to 200 staff is 1000 MB.
    max_total: ByteSize = ByteSize(100_000_000)
    max_attachment: ByteSize = ByteSize(15_000_000)


class Shouting(Strict):
    enabled: bool = True
    clause: str = "appendix"
    capitals_ratio: float = Field(default=0.7, gt=0, le=1)
    min_body_letters: int = Field(default=40, ge=1)
    min_subject_letters: int = Field(default=12, ge=1)
    # A run of this many consecutive all-capitals words shouts even in a long, calm message.
    min_shouted_words: int = Field(default=12, ge=2)


class Advertising(Strict):
    enabled: bool = True
    clause: str = "5.5"
    phrases: str = "lexicon/advertising.txt"
    # Points needed for a finding; see detectors/advertising.py for what scores.
    threshold: int = Field(default=4, ge=1)
    many_recipients: int = Field(default=25, ge=1)


class HiddenText(Strict):
    enabled: bool = True
    clause: str = "5.5"
    min_chars: int = Field(default=40, ge=1)


class MalformedMime(Strict):
    enabled: bool = True
    clause: str = "2.2"


# Kinds of attachment problem dangerous_attachment reports; rules block them per direction.
ATTACHMENT_KINDS = (
    "executable",
    "script",
    "disk_image",
    "office_macro",
    "html_script",
    "type_mismatch",
    "double_extension",
    "name_trick",
    "encrypted",
    "archive_bomb",
    "archive_unreadable",
)


class AttachmentException(Strict):
    """Kinds allowed from some senders, e.g. encrypted zips from the local authority."""

    sender_domains: list[str] = Field(min_length=1)
    kinds: list[str] = Field(min_length=1)

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, v: list[str]) -> list[str]:
        unknown = [k for k in v if k not in ATTACHMENT_KINDS]
        if unknown:
            raise ValueError(f"unknown attachment kind(s) {unknown} (known: {', '.join(ATTACHMENT_KINDS)})")
        return v


class DangerousAttachment(Strict):
    enabled: bool = True
    clause: str = "1.2"
    # Kinds reported for each direction; a kind not listed for a direction is not a finding.
    blocked: dict[Direction, list[str]] = {
        Direction.INBOUND: list(ATTACHMENT_KINDS),
        Direction.OUTBOUND: list(ATTACHMENT_KINDS),
        Direction.INTERNAL: list(ATTACHMENT_KINDS),
    }
    exceptions: list[AttachmentException] = []
    # Every attachment from outside the school is worth a tag (appendix: "do not open
    # attachments from unknown sources").
    tag_external: bool = True
    max_depth: int = Field(default=3, ge=0, le=10)
    max_members: int = Field(default=1000, ge=1)
    max_total: ByteSize = ByteSize(200_000_000)
    max_ratio: float = Field(default=100.0, gt=1)

    @field_validator("blocked")
    @classmethod
    def _known_blocked(cls, v: dict[Direction, list[str]]) -> dict[Direction, list[str]]:
        for kinds in v.values():
            AttachmentException._known_kinds(kinds)
        return v


class VirusScan(Strict):
    enabled: bool = True
    clause: str = "1.2"
    # clamd's socket: unix:/run/clamav/clamd.ctl (Debian) or inet:127.0.0.1:3310.
    clamd: str = "unix:/run/clamav/clamd.ctl"
    timeout: float = Field(default=30.0, gt=0)
    # Largest message sent to clamd; must not exceed clamd's StreamMaxLength.
    max_stream: ByteSize = ByteSize(100_000_000)
    # clamd.conf to compare limits with at start and in check-rules; empty to skip.
    clamd_conf: str = "/etc/clamav/clamd.conf"
    # clamd down or slow: "tempfail" keeps the mail for a retry; "tag" delivers it marked
    # unscanned. Mail with attachments and mail without can be treated differently.
    # "attachments": only messages with attachments go to clamd (a text-only message
    # carries nothing to open); "all": every message.
    scan: Literal["attachments", "all"] = "attachments"
    unavailable_with_attachments: Literal["tempfail", "tag"] = "tempfail"
    unavailable_without_attachments: Literal["tempfail", "tag"] = "tag"


class Blocklist(Strict):
    """Block entries a technician approved (from the report address or by hand), clause 5.7."""

    enabled: bool = True
    clause: str = "5.7"
    # Received mail only by default: the lists are about mail sent to the school.
    directions: list[Direction] = [Direction.INBOUND]


class Detectors(Strict):
    obscene_language: ObsceneLanguage = ObsceneLanguage()
    safeguarding_concern: SafeguardingConcern = SafeguardingConcern()
    offensive_links: OffensiveLinks = OffensiveLinks()
    missing_bcc: MissingBcc = MissingBcc()
    bulk_weight: BulkWeight = BulkWeight()
    shouting: Shouting = Shouting()
    advertising: Advertising = Advertising()
    hidden_text: HiddenText = HiddenText()
    malformed_mime: MalformedMime = MalformedMime()
    dangerous_attachment: DangerousAttachment = DangerousAttachment()
    virus_scan: VirusScan = VirusScan()
    blocklist: Blocklist = Blocklist()


class ActionRule(Strict):
    """One line of the decision table: the first rule that matches a finding decides its action."""

    detector: list[str] | None = None
    category: list[str] | None = None
    direction: list[Direction] | None = None
    sender_role: list[Role] | None = None
    min_severity: Annotated[Severity, Field()] = Severity.MILD
    action: Action
    guidance: str | None = None
    alert: list[str] = []
    subject_prefix: str | None = None
    # A finding matching this rule means the message must not go back to its sender:
    # a reject becomes a quarantine (for example a child writing about self-harm).
    no_bounce: bool = False
    # Text for the SMTP reply; {clause}, {summary} and {reference} are filled in.
    reply: str | None = None

    @field_validator("detector", "category", "direction", "sender_role", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @field_validator("min_severity", mode="before")
    @classmethod
    def _severity(cls, v: object) -> object:
        return Severity.parse(v) if isinstance(v, str) else v


class FailureMode(Strict):
    """What a check that cannot run (crashed, timed out, dependency down) does to the message."""

    default: Literal["tempfail", "fail_open"] = "tempfail"
    # Per detector override, for example a best-effort check that should never delay mail.
    detectors: dict[str, Literal["tempfail", "fail_open"]] = {}


class Headers(Strict):
    verdict: str = "X-School-Policy"
    findings: str = "X-School-Policy-Findings"


class QuarantineSettings(Strict):
    # Held messages older than this are deleted, body and record, by `quarantine purge`.
    retention_days: int = Field(default=30, ge=1, le=3650)
    # The Principal and nominees (login names or addresses): only they can record the
    # authority to open a message marked personal (clauses 2.6 and 2.7).
    personal_authority: list[str] = []


class Notifications(Strict):
    # Guidance mail to a trusted school sender whose message was refused (appendix).
    guidance: bool = True
    # At most this many guidance mails per sender per hour: a looping script gets a few.
    guidance_per_hour: int = Field(default=10, ge=0)
    # From: of guidance and alerts; postmaster@ the first school domain when empty.
    from_address: str | None = None
    # Roles (school.contacts keys) that get one daily digest instead of a mail per message.
    digest_roles: list[str] = []
    # The role whose daily digest lists everything held in the last day (technicians).
    quarantine_digest: str | None = "it"


class PolicyFile(Strict):
    school: School
    detectors: Detectors = Detectors()
    actions: list[ActionRule] = Field(min_length=1)
    on_failure: FailureMode = FailureMode()
    quarantine: QuarantineSettings = QuarantineSettings()
    notifications: Notifications = Notifications()
    headers: Headers = Headers()
    # Reference ids start with this, so a school can tell its references apart in bounces.
    reference_prefix: str = Field(default="RB", pattern=r"^[A-Z0-9]{1,8}$")

    @model_validator(mode="after")
    def _last_rule_catches_all(self) -> PolicyFile:
        last = self.actions[-1]
        if any((last.detector, last.category, last.direction, last.sender_role)) or (
            last.min_severity > Severity.MILD
        ):
            raise ValueError(
                "the last rule in 'actions' must match every finding (no detector, category, "
                "direction, sender_role or min_severity), so no finding is left without an action"
            )
        return self
