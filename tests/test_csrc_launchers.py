"""Source-level checks of the C++/CUDA launchers for defects no CPU run can show (issue 18, item 7): a raw
pointer taken from a temporary (`x.contiguous().data_ptr()` is freed at the end of the statement, and the next
allocation, e.g. the GEMM workspace, may reuse its memory while the kernel still reads it), and an operand's
pointer taken from an input the launcher never made contiguous."""

from __future__ import annotations

import pathlib
import re

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
LAUNCHERS = sorted(p for p in CSRC.rglob("*") if p.suffix in (".cu", ".cpp") and "tests" not in p.parts)
# a call result (`...)`) whose data_ptr is taken: the pointer of a temporary
TEMPORARY_POINTER = re.compile(r"\)\s*\.\s*(?:data_ptr|const_data_ptr|mutable_data_ptr)\b")


def _statements_taking_pointers(text: str):
    for stmt in re.split(r";", re.sub(r"//[^\n]*", "", text)):
        if "data_ptr" in stmt:
            yield " ".join(stmt.split())


def test_no_launcher_keeps_the_pointer_of_a_temporary():
    assert LAUNCHERS
    bad = [(p.name, s) for p in LAUNCHERS for s in _statements_taking_pointers(p.read_text())
           if TEMPORARY_POINTER.search(s)]
    assert not bad, bad


def test_cutlass_gemm_reads_only_its_own_contiguous_copies():
    """Every operand pointer handed to the CUTLASS kernel comes from a tensor made contiguous in the launcher."""
    text = (CSRC / "nvfp4_gemm" / "nvfp4_gemm_launcher.cu").read_text()
    copies = set(re.findall(r"(\w+) = \w+\.contiguous\(\)", text))
    pointers = dict(re.findall(r"p\.(a|b|sfa|sfb) = (?:reinterpret_cast<[^>]*>\()?(\w+)\.data_ptr", text))
    assert set(pointers) == {"a", "b", "sfa", "sfb"}, pointers
    assert set(pointers.values()) <= copies, (pointers, copies)


def test_the_checks_catch_the_old_launcher():
    """The two rules above fail on the launcher as it was (pointers of `a.contiguous()`, raw scale pointers)."""
    old = ("  p.a = a.contiguous().data_ptr<uint8_t>();\n"
           "  p.sfa = reinterpret_cast<const uint8_t*>(a_scale.data_ptr());\n")
    assert any(TEMPORARY_POINTER.search(s) for s in _statements_taking_pointers(old))
    assert re.findall(r"p\.(a|b|sfa|sfb) = (?:reinterpret_cast<[^>]*>\()?(\w+)\.data_ptr", old) == [("sfa", "a_scale")]
