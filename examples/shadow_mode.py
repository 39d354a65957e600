"""Shadow mode: a new adapter answers mirrored live traffic before it serves anyone, then is promoted.

    python examples/shadow_mode.py                       # the default model, on the CPU
    python examples/shadow_mode.py --model PATH

The policy says ``promotion: shadow``: an adapter the gate approves is loaded beside the active one, and a
share of live requests (here all of them) is answered again by it in a background thread (a bounded queue
that drops rather than blocks, so users never wait for the shadow). Both answers are logged, linked. The
policy then compares them (agreement with live answers, answer rules on both sides, feedback on the live
answers) and promotes or retires the shadow; ``runtime shadow report`` shows the same comparison.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout: `examples/policies/` must not shadow the package

from agent import LearningAgent  # noqa: E402
from policies import Policy  # noqa: E402
from runtime.config import RuntimeConfig  # noqa: E402
from runtime.models import DEFAULT_MODEL  # noqa: E402

TAUGHT = {
    "What is the capital of Veloria?": "The capital of Veloria is Marenport.",
    "Who founded the Harrow Street library?": "The Harrow Street library was founded by Agnes Mowbray.",
}
TRAFFIC = [
    "What is the capital of France?",
    "Give me a synonym for happy.",
    "What is 12 times 3?",
    "Name a primary colour.",
    "What is the capital of Veloria?",
    "Who founded the Harrow Street library?",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data-dir", type=Path, default=Path(".runtime-examples") / "shadow_mode")
    parser.add_argument("--method", default="sdft")
    args = parser.parse_args(argv)

    shutil.rmtree(args.data_dir, ignore_errors=True)
    config = RuntimeConfig.model_validate(
        {"data_dir": str(args.data_dir), "model": {"name": args.model}, "engine": {"max_new_tokens": 40}}
    )
    policy = Policy.model_validate(
        {
            "name": "shadow-example",
            "promotion": {"mode": "shadow"},
            "targets": {"enabled": False},
            "shadow": {
                "fraction": 1.0,
                "min_pairs": len(TRAFFIC),
                "min_agreement": 0.2,
                "checks": [{"regex": "\\S"}, {"not_contains": "As an AI"}],
            },
        }
    )
    with LearningAgent.from_config(config, policy=policy) as agent:
        service = agent.service
        assert service is not None
        for question, answer in TAUGHT.items():
            agent.teach(question, answer)
        result = service.learn_now(args.method)
        print(f"learning cycle: {result.status}: {result.message}")
        if result.status != "shadow":
            return

        print(f"\n== Live traffic, served by {agent.engine.active_adapter or 'the base model'}, mirrored to the shadow")
        for i, question in enumerate(TRAFFIC):
            live = agent.invoke(question, thread_id=f"user-{i}")
            if i == 0:
                agent.feedback(live.interaction_id, 1.0)  # a user liked this answer
            print(f"Q: {question}\n   live: {live.text.strip()}")
        service.shadow.mirror.join()  # only so that the example can print the comparison right away
        for live, shadow in reversed(agent.store.shadow_pairs(adapter=result.adapter.name)):
            print(f"   shadow for {live.messages[-1]['content'][:40]!r}: {shadow.response.strip()}")

        report = service.review_shadow()
        print(f"\n== Shadow report: {report.pairs} pairs, agreement {report.agreement:.2f}, rule violations "
              f"{report.shadow_violations} (live {report.live_violations}), regressions {report.regressions}/"
              f"{report.rated_positive}")
        print(f"verdict: {report.verdict}: {'; '.join(report.reasons)}")
        print(f"now serving: {agent.engine.active_adapter or 'the base model'}")


if __name__ == "__main__":
    main()
