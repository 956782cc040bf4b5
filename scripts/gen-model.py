#!/usr/bin/env python3
"""Generate src/model/shapes/*.rs from the App Mesh API model (botocore's service-2.json).

Every structure, union, enum and scalar constraint of the 2019-01-25 model becomes a Rust type
with serde (App Mesh's camelCase names, members in the model's order) and a `Validate` impl that
checks required members, unions, lengths, ranges, enums and patterns with field paths. App Mesh's
cross-field rules are hand-written in src/model/rules.rs.

Usage: scripts/gen-model.py [path/to/service-2.json]
  (default: the model inside the test venv's awscli, which vendors botocore)
Run it again after upgrading botocore; tests/model_generated.rs fails when the output is stale.
"""
import glob, gzip, html, json, os, re, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "src", "model", "shapes")
KEYWORDS = {"match", "type", "ref", "mod", "fn", "use", "in", "loop", "move", "self", "static", "struct", "trait", "where", "async", "await", "dyn", "enum", "impl", "let", "mut", "pub", "return", "super", "crate", "const", "else", "extern", "false", "true", "for", "if", "while", "break", "continue", "as", "unsafe", "box", "final", "override", "priv", "macro", "virtual", "yield", "try", "abstract", "become", "do", "typeof", "unsized"}


def find_model():
    if len(sys.argv) > 1:
        return sys.argv[1]
    cands = glob.glob(os.path.join(ROOT, ".venv/lib/python*/site-packages/awscli/botocore/data/appmesh/2019-01-25/service-2.json*"))
    if not cands:
        sys.exit("service-2.json not found: run scripts/test once (it creates .venv) or pass the path")
    return cands[0]


def load(path):
    if path.endswith(".gz"):
        with gzip.open(path, "rt") as f:
            return json.load(f)
    with open(path) as f:
        return json.load(f)


def jd(v):
    """A Rust string literal (JSON's escapes are Rust's, given non-ASCII stays literal)."""
    return json.dumps(v, ensure_ascii=False)


def snake(name):
    s = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    s = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", s).lower()
    return "r#" + s if s in KEYWORDS else s


def variant(value):
    parts = re.split(r"[^A-Za-z0-9]+", value)
    out = "".join(p[:1].upper() + p[1:].lower() if p.isupper() or p.islower() else p[:1].upper() + p[1:] for p in parts if p)
    if out[0].isdigit():
        out = "V" + out
    return out


def doc(text, indent):
    if not text:
        return ""
    t = re.sub(r"<[^>]+>", " ", text)
    t = html.unescape(re.sub(r"\s+", " ", t)).strip()
    if not t:
        return ""
    # The first two sentences carry the meaning; the rest repeats console prose.
    sentences = re.split(r"(?<=[.!?])\s+", t)
    t = " ".join(sentences[:2])
    words, lines, cur = t.split(" "), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > 92 and cur:
            lines.append(cur)
            cur = w
        else:
            cur = (cur + " " + w).strip()
    if cur:
        lines.append(cur)
    return "".join(f"{indent}/// {l}\n" for l in lines)


def main():
    model = load(find_model())
    shapes = model["shapes"]
    ops = model["operations"]
    inputs = {op["input"]["shape"] for op in ops.values() if "input" in op}
    outputs = {op["output"]["shape"] for op in ops.values() if "output" in op}

    def body_members(name):
        s = shapes[name]
        return {k: v for k, v in s.get("members", {}).items() if "location" not in v}

    emit = []
    for name, s in sorted(shapes.items()):
        if s["type"] == "structure":
            if s.get("exception"):
                continue
            if name in outputs and ("payload" in s or not s.get("members")):
                continue
            if name in inputs and not body_members(name):
                continue
            emit.append(name)
        elif s["type"] == "string" and "enum" in s:
            emit.append(name)

    # Group shapes by the resource whose spec reaches them, so each file reads as one resource.
    roots = [
        ("mesh", ["MeshSpec", "MeshData", "MeshRef"]),
        ("virtual_node", ["VirtualNodeSpec", "VirtualNodeData", "VirtualNodeRef"]),
        ("virtual_service", ["VirtualServiceSpec", "VirtualServiceData", "VirtualServiceRef"]),
        ("virtual_router", ["VirtualRouterSpec", "VirtualRouterData", "VirtualRouterRef"]),
        ("route", ["RouteSpec", "RouteData", "RouteRef"]),
        ("virtual_gateway", ["VirtualGatewaySpec", "VirtualGatewayData", "VirtualGatewayRef"]),
        ("gateway_route", ["GatewayRouteSpec", "GatewayRouteData", "GatewayRouteRef"]),
    ]

    def reach(start, seen):
        stack = list(start)
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            s = shapes[n]
            for m in s.get("members", {}).values():
                stack.append(m["shape"])
            if s["type"] == "list":
                stack.append(s["member"]["shape"])
        return seen

    owner = {}
    for mod, starts in roots:
        for n in reach(starts, set()):
            owner.setdefault(n, set()).add(mod)
    group = {}
    for n in emit:
        mods = owner.get(n, set())
        if n in inputs or n in outputs:
            group[n] = "operations"
        elif len(mods) == 1:
            group[n] = next(iter(mods))
        else:
            group[n] = "common"

    def rust_type(shape_name):
        s = shapes[shape_name]
        t = s["type"]
        if t == "structure":
            return shape_name
        if t == "string":
            return shape_name if "enum" in s else "String"
        if t in ("integer", "long"):
            return "i64"
        if t == "boolean":
            return "bool"
        if t == "timestamp":
            return "f64"
        if t == "list":
            return f"Vec<{rust_type(s['member']['shape'])}>"
        raise ValueError(t)

    def checks(expr, shape_name, indent):
        """Validation statements for a value `expr` (a reference) of shape `shape_name`."""
        s = shapes[shape_name]
        t = s["type"]
        out = []
        if t == "structure":
            out.append(f"{indent}{expr}.validate(v);")
        elif t == "string" and "enum" not in s:
            if "min" in s or "max" in s:
                out.append(f"{indent}v.length({expr}, {s.get('min', 0)}, {s.get('max', 'usize::MAX')});")
            if "pattern" in s:
                out.append(f"{indent}v.pattern({expr}, {jd(s['pattern'])});")
        elif t in ("integer", "long"):
            if "min" in s or "max" in s:
                lo = s.get("min", "i64::MIN")
                hi = s.get("max", "i64::MAX")
                out.append(f"{indent}v.range(*{expr}, {lo}, {hi});")
        elif t == "list":
            if "min" in s or "max" in s:
                out.append(f"{indent}v.count({expr}.len(), {s.get('min', 0)}, {s.get('max', 'usize::MAX')});")
            inner = checks("item", s["member"]["shape"], indent + "        ")
            if inner:
                out.append(f"{indent}for (i, item) in {expr}.iter().enumerate() {{")
                out.append(f"{indent}    v.index(i, |v| {{")
                out.extend(inner)
                out.append(f"{indent}    }});")
                out.append(f"{indent}}}")
        return out

    files = {}
    for n in emit:
        s = shapes[n]
        buf = []
        if s["type"] == "string":
            buf.append(doc(s.get("documentation", ""), ""))
            buf.append("#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]\n")
            buf.append(f"pub enum {n} {{\n")
            for e in s["enum"]:
                buf.append(f"    #[serde(rename = {jd(e)})]\n    {variant(e)},\n")
            buf.append("}\n\n")
            buf.append(f"impl {n} {{\n    /// The value as App Mesh spells it on the wire.\n    pub fn as_str(self) -> &'static str {{\n        match self {{\n")
            for e in s["enum"]:
                buf.append(f"            Self::{variant(e)} => {jd(e)},\n")
            buf.append("        }\n    }\n}\n\n")
            files.setdefault(group[n], []).append("".join(buf))
            continue
        members = body_members(n) if n in inputs else s.get("members", {})
        required = set(s.get("required", []))
        union = s.get("union", False)
        d = doc(s.get("documentation", ""), "")
        if union:
            d += "///\n/// A union: exactly one member is set.\n"
        buf.append(d)
        derive_default = all(k not in required for k in members)
        buf.append("#[derive(Debug, Clone, PartialEq, Serialize, Deserialize" + (", Default" if derive_default else "") + ")]\n")
        buf.append("#[serde(deny_unknown_fields)]\n")
        buf.append(f"pub struct {n} {{\n")
        vbody = []
        for m, ms in members.items():
            field = snake(m)
            ty = rust_type(ms["shape"])
            buf.append(doc(ms.get("documentation", ""), "    "))
            if m in required:
                buf.append(f"    #[serde(rename = {jd(m)})]\n    pub {field}: {ty},\n")
                c = checks("x", ms["shape"], "            ")
                if c:
                    vbody.append(f"        v.field({jd(m)}, |v| {{\n            let x = &self.{field};\n" + "\n".join(c) + "\n        });\n")
            else:
                buf.append(f"    #[serde(rename = {jd(m)}, default, skip_serializing_if = \"Option::is_none\")]\n    pub {field}: Option<{ty}>,\n")
                c = checks("x", ms["shape"], "                ")
                if c:
                    vbody.append(f"        if let Some(x) = &self.{field} {{\n            v.field({jd(m)}, |v| {{\n" + "\n".join(c) + "\n            });\n        }\n")
        buf.append("}\n\n")
        if union:
            names = list(members)
            setv = ", ".join(f"self.{snake(m)}.is_some()" for m in names)
            vbody.insert(0, f"        v.union(&[{', '.join(jd(m) for m in names)}], &[{setv}]);\n")
        if vbody:
            buf.append(f"impl Validate for {n} {{\n    fn validate(&self, v: &mut Validator) {{\n" + "".join(vbody) + "    }\n}\n\n")
        else:
            buf.append(f"impl Validate for {n} {{\n    fn validate(&self, _v: &mut Validator) {{}}\n}}\n\n")
        files.setdefault(group[n], []).append("".join(buf))

    os.makedirs(OUT, exist_ok=True)
    header = "// @generated by scripts/gen-model.py from the App Mesh API model (botocore, appmesh 2019-01-25).\n// Do not edit by hand: change the generator and run it again.\n\n"
    mods = sorted(files)
    for mod in mods:
        with open(os.path.join(OUT, f"{mod}.rs"), "w") as f:
            f.write(header)
            f.write("#![allow(clippy::doc_lazy_continuation, clippy::doc_overindented_list_items)]\n\n")
            f.write("use serde::{Deserialize, Serialize};\n\n")
            f.write("use crate::model::validate::{Validate, Validator};\n")
            f.write("#[allow(unused_imports)]\nuse super::*;\n\n")
            f.write("".join(files[mod]).rstrip() + "\n")
    with open(os.path.join(OUT, "mod.rs"), "w") as f:
        f.write("//! The App Mesh 2019-01-25 shapes, one file per resource (plus `common` for shapes several\n")
        f.write("//! resources share and `operations` for request and list bodies). Generated from botocore's\n")
        f.write("//! model by scripts/gen-model.py: every member, enum and constraint, with field-path validation.\n\n")
        f.write(header)
        for mod in mods:
            f.write(f"mod {mod};\n")
        f.write("\n")
        for mod in mods:
            f.write(f"pub use {mod}::*;\n")


main()
