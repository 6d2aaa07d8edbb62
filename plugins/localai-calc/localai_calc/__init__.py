"""A calculator tool for localai: arithmetic and common math functions, evaluated by walking the
expression's syntax tree. Nothing else is evaluated (no names beyond the table below, no
attributes, no calls of other functions), and numbers are kept small enough to compute quickly.
"""

from __future__ import annotations

import ast
import math
import operator

import pluggy

hookimpl = pluggy.HookimplMarker("localai")

BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
FUNCTIONS = {
    name: getattr(math, name)
    for name in [
        "sqrt",
        "exp",
        "log",
        "log10",
        "log2",
        "sin",
        "cos",
        "tan",
        "asin",
        "acos",
        "atan",
        "floor",
        "ceil",
        "factorial",
    ]
} | {"abs": abs, "round": round, "min": min, "max": max}
CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
MAX_EXPONENT = 10_000  # 2**10000 is instant; 9**9**9 would hang the process
MAX_LENGTH = 500


class CalcError(ValueError):
    pass


def evaluate(expression: str) -> float | int:
    if len(expression) > MAX_LENGTH:
        raise CalcError(f"expression longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(expression.replace("^", "**"), mode="eval")
    except SyntaxError as e:
        raise CalcError(f"not an arithmetic expression: {e.msg}") from None
    return _eval(tree.body)


def _eval(node: ast.AST):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in CONSTANTS:
        return CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise CalcError(f"exponent {right} is too large")
        if isinstance(node.op, ast.Mult) and _digits(left) + _digits(right) > MAX_EXPONENT:
            raise CalcError("result too large")
        return BINARY[type(node.op)](left, right)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in FUNCTIONS
        and not node.keywords
    ):
        args = [_eval(a) for a in node.args]
        if node.func.id == "factorial" and args and args[0] > 1000:
            raise CalcError("factorial argument above 1000")
        return FUNCTIONS[node.func.id](*args)
    raise CalcError(f"not allowed in a calculation: {ast.unparse(node)!r}")


def _digits(x) -> int:
    return len(str(abs(int(x)))) if isinstance(x, int) else 0


def calculator(expression: str) -> str:
    try:
        return repr(evaluate(expression))
    except (CalcError, ArithmeticError, ValueError, TypeError) as e:
        return f"error: {e}"


@hookimpl
def localai_register_tools(register):
    from localai.tools import Tool

    register(
        Tool(
            name="calculator",
            description="Evaluate an arithmetic expression, e.g. '2*(3+4)**2' or 'sqrt(2)/pi'.",
            fn=calculator,
            parameters={
                "type": "object",
                "properties": {"expression": {"type": "string"}},
                "required": ["expression"],
            },
        )
    )
