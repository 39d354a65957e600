"""Embed the learning agent in an app: a small support desk that learns from its staff's corrections.

    python examples/embed_in_app.py                               # the default model, on the CPU
    python examples/embed_in_app.py --model PATH --policy FILE    # your model directory and policy

The app answers customers through ``agent.invoke``; when a staff member fixes an answer, the app calls
``agent.correct``. Learning happens in the runtime: here one cycle is run by hand (``service.learn_now``)
so that the example finishes; in production pass ``background_learning=True`` and the policy's schedule
runs it (``schedule:`` in the policy). Every update passes the policy gate (protected refusals, answer
format, reading-comprehension retention, "did it learn what it was taught") before it serves, and an
operator can roll it back. Everything lands in ``--data-dir`` (DuckDB log and adapter registry).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout: `examples/policies/` must not shadow the package

from agent import LearningAgent  # noqa: E402
from policies import load_policy  # noqa: E402
from runtime.config import RuntimeConfig  # noqa: E402
from runtime.models import DEFAULT_MODEL  # noqa: E402

HERE = Path(__file__).resolve().parent

# What the support desk knows that the base model cannot: fictional company facts.
FAQ = {
    "How long is the refund window at Brindlewood Outfitters?": "The refund window is 45 days from delivery.",
    "Which carrier ships Brindlewood Outfitters orders?": "Brindlewood Outfitters ships with Harlow Freight.",
    "What is the Brindlewood Outfitters support phone number?": "Call Brindlewood support at 0800 555 0199.",
}


class SupportDesk:
    """The app: it answers customers and records the staff's corrections."""

    def __init__(self, agent: LearningAgent) -> None:
        self.agent = agent

    def answer(self, customer: str, question: str) -> tuple[str, str | None]:
        result = self.agent.invoke(question, thread_id=customer)
        return result.text, result.interaction_id

    def staff_correction(self, interaction_id: str, better: str) -> None:
        self.agent.correct(interaction_id, better)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model alias or local model directory")
    parser.add_argument("--policy", type=Path, default=HERE / "policies" / "support_bot.yaml")
    parser.add_argument("--data-dir", type=Path, default=Path(".runtime-examples") / "embed_in_app")
    parser.add_argument("--method", default="sdft", help="sdft (default), sft or auto")
    args = parser.parse_args(argv)

    shutil.rmtree(args.data_dir, ignore_errors=True)  # a fresh log and registry for each run of the example
    config = RuntimeConfig.model_validate(
        {"data_dir": str(args.data_dir), "model": {"name": args.model}, "engine": {"max_new_tokens": 48}}
    )
    policy = load_policy(args.policy)
    policy.promotion.mode = "direct"  # the policy file says shadow; this example promotes at once
    with LearningAgent.from_config(config, policy=policy) as agent:
        desk = SupportDesk(agent)
        service = agent.service
        assert service is not None

        print("== Customers ask; the staff correct wrong answers")
        for i, (question, truth) in enumerate(FAQ.items()):
            text, interaction_id = desk.answer(f"customer-{i}", question)
            print(f"Q: {question}\nA: {text.strip()}")
            desk.staff_correction(interaction_id, truth)
            print(f"   corrected -> {truth}")

        print(f"\n== One learning cycle ({args.method}) through the gate of policy '{policy.name}'")
        result = service.learn_now(args.method)
        print(f"{result.status}: {result.message}")
        decision = agent.store.decisions(1, adapter=result.adapter.name)[-1] if result.adapter else None
        if decision is not None:
            for check in decision.checks or []:
                mark = "pass" if check["passed"] else ("VETO" if check["veto"] else "fail")
                print(f"   [{mark}] {check['kind']} {check['name']}: {check['detail']}")

        print("\n== The same questions now")
        for question in FAQ:
            text, _ = desk.answer("customer-after", question)
            print(f"Q: {question}\nA: {text.strip()}  [{agent.engine.active_adapter or 'base'}]")

        if result.status == "activated":
            restored = service.rollback(reason="example: operator rolls the update back")
            print(f"\n== Rolled back: now serving {restored.name if restored else 'the base model'}")
        print(f"\nLog and registry in {args.data_dir}; try: runtime decisions -c <config with data_dir there>")


if __name__ == "__main__":
    main()
