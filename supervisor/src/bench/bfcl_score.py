# Scores agentd's emitted calls with BFCL's own AST checker (bfcl-eval, Apache-2.0).
#
# argv: SUITE_DIR RESULTS.json. RESULTS is a list of
#   {"id", "category", "mode", "kind": "call" | "none" | "invalid", "call": {name: {arg: value}}}
# Prints one JSON list: for each result, {"valid": bool, "error": str}.
#
# Only the checker module is imported. Its one link to the rest of the package (the model
# table, which pulls in every provider SDK) is replaced by a stub that says what agentd does
# with names: manifests cannot hold "." in a tool name, so agentd writes "_" instead, exactly
# as BFCL expects of OpenAI-style models (underscore_to_dot).
import json
import sys
import types
from types import SimpleNamespace

suite, results_path = sys.argv[1], sys.argv[2]
sys.path.insert(0, suite)


class _Models(dict):
    def __missing__(self, key):
        return SimpleNamespace(underscore_to_dot=True)


stub = types.ModuleType("bfcl_eval.constants.model_config")
stub.MODEL_CONFIG_MAPPING = _Models()
sys.modules["bfcl_eval.constants.model_config"] = stub

from bfcl_eval.constants.enums import Language  # noqa: E402
from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker  # noqa: E402

data = suite + "/bfcl_eval/data/"


def load(path):
    with open(path) as f:
        return {q["id"]: q for q in map(json.loads, f)}


questions, answers = {}, {}
results = json.load(open(results_path))
for cat in sorted({r["category"] for r in results}):
    questions.update(load(data + "BFCL_v4_" + cat + ".json"))
    if cat != "irrelevance":
        answers.update(load(data + "possible_answer/BFCL_v4_" + cat + ".json"))

out = []
for r in results:
    if r["category"] == "irrelevance":
        # BFCL's rule: correct when the output holds no decodable function call.
        made_call = r["kind"] == "call"
        out.append({"valid": not made_call, "error": "made a call" if made_call else ""})
        continue
    if r["kind"] != "call":
        out.append({"valid": False, "error": "no well-formed call" if r["kind"] == "invalid" else "no call"})
        continue
    q = questions[r["id"]]
    verdict = ast_checker(
        q["function"],
        [r["call"]],
        answers[r["id"]]["ground_truth"],
        Language.PYTHON,
        r["category"],
        "agentd",
    )
    out.append({"valid": bool(verdict["valid"]), "error": "; ".join(map(str, verdict.get("error", [])))})
print(json.dumps(out))
