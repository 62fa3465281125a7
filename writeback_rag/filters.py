"""Search filters as an expression, not as a list of every allowed chunk id.

A Filter says which chunks a search may return: by kind (source documents, knowledge units) and by
predicates on their documents (id or source glob, metadata values). The kind is known to every index
itself, so it is evaluated there with no query to the records; document predicates are evaluated by the
record store (`store.Records.ids`), once per search and only when given. A remote engine receives the same
expression to translate into its own filter language."""

from dataclasses import dataclass

from .errors import InputError

KINDS = ("source", "unit")


@dataclass(frozen=True)
class Filter:
    kinds: frozenset = frozenset(KINDS)
    doc_globs: tuple = ()
    source_globs: tuple = ()
    meta: tuple = ()          # ((key, value as text), ...)

    @classmethod
    def parse(cls, filters=None, include_units=True):
        """From the API's {key: value} filters: source (substring or glob), doc (glob), kind, or a
        metadata key (meta.KEY or KEY, compared as text)."""
        kinds, docs, sources, meta = set(KINDS if include_units else ("source",)), [], [], []
        for key, value in (filters or {}).items():
            if not isinstance(key, str) or not key.strip():
                raise InputError(f"filter {key!r}={value!r}: empty key; use source, doc, kind or a metadata key")
            if key == "source":
                sources.append(value if any(c in value for c in "*?[") else f"*{value}*")
            elif key in ("doc", "doc_id"):
                docs.append(value)
            elif key == "kind":
                kinds &= {value}
            else:
                meta.append((key.removeprefix("meta."), str(value)))
        return cls(frozenset(kinds), tuple(docs), tuple(sources), tuple(meta))

    def only(self, kind):
        """The same filter restricted to one kind (the separate candidate lists of sources and units)."""
        return Filter(self.kinds & {kind}, self.doc_globs, self.source_globs, self.meta)

    @property
    def on_records(self):
        """Whether it has predicates on documents (beyond kind)."""
        return bool(self.doc_globs or self.source_globs or self.meta)
