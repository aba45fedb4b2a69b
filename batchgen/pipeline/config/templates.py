"""prompt.template: the columns a str.format template names, and what the job file refuses in one."""
from __future__ import annotations


def template_fields(template: str) -> list[str]:
    """The top-level row columns a str.format template refers to ("{a[0]}" -> "a"). ValueError
    for what the job file refuses: positional fields, attribute lookups ({a.b}: a row value's
    attributes are never a column), conversions other than !s !r !a, and any format spec
    ({x:>100000000000} pads each prompt to that width: memory, not text)."""
    import _string  # str.format's own parser, as string.Formatter uses it
    import string

    out = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        field_text = "{" + name + ("!" + conversion if conversion else "") + (":" + spec if spec else "") + "}"
        if name == "" or name.isdigit():
            raise ValueError("positional fields like {} or {0} are not allowed; name a column: {prompt}")
        base, rest = _string.formatter_field_name_split(name)
        if any(is_attr for is_attr, _ in rest):  # list() also checks the [..] syntax
            raise ValueError(f"{field_text}: attribute lookups are not allowed; index a mapping column with [key]")
        if conversion not in (None, "s", "r", "a"):
            raise ValueError(f"{field_text}: unknown conversion '!{conversion}' (use !s, !r or !a)")
        if spec:
            raise ValueError(f"{field_text}: format specs (':{spec[:20]}') are not allowed; "
                             "the template inserts column values as they are")
        if base not in out:
            out.append(base)
    return out
