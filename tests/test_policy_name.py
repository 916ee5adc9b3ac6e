"""The policy-name grammar of the workflow's result paths (dmr.policy_name)."""
import pytest

from dmr.policy_name import Policy, format_policy, parse_policy

KNOWN = {
    "dmr-k0.4": Policy("dmr", "k", "0.4"),
    "random-k0.2": Policy("random", "k", "0.2"),
    "oracle-k0.7": Policy("oracle", "k", "0.7"),
    "dmr-t0.5": Policy("dmr", "t", "0.5"),
    "dmr0-k0.2": Policy("dmr0", "k", "0.2"),
    "grpo-k0.4": Policy("grpo", "k", "0.4"),
    "grpo-t0.5": Policy("grpo", "t", "0.5"),
    "uncertainty-k0.4": Policy("uncertainty", "k", "0.4"),
    "dmr-c0.7": Policy("dmr", "c", "0.7"),
}


@pytest.mark.parametrize("name,policy", KNOWN.items())
def test_known_names_parse_and_round_trip(name, policy):
    assert parse_policy(name) == policy and policy.routed
    assert format_policy(*policy) == name


@pytest.mark.parametrize("kind,mode,value,name", [("dmr", "k", 0.4, "dmr-k0.4"), ("dmr0", "k", 0.2, "dmr0-k0.2"),
                                                  ("grpo", "t", 0.5, "grpo-t0.5"), ("random", "k", 1.0, "random-k1"),
                                                  ("oracle", "k", 0.70, "oracle-k0.7")])
def test_format_writes_numbers_as_g(kind, mode, value, name):
    assert format_policy(kind, mode, value) == name
    assert parse_policy(name) == Policy(kind, mode, name.split("-", 1)[1][1:])


@pytest.mark.parametrize("name", ["full", "quant", "random:0.3"])
def test_unrouted_names_pass_through(name):
    assert parse_policy(name) == Policy(name) and not parse_policy(name).routed


@pytest.mark.parametrize("name,problem", [("bogus-k0.4", "unknown kind 'bogus'"), ("dmr-x0.4", "unknown mode 'x'"),
                                          ("dmr-kabc", "budget 'abc' is not a number"),
                                          ("dmr-t", "threshold '' is not a number"),
                                          ("random-t0.5", "baselines are matched to a budget, write random-k0.5"),
                                          ("grpo-c0.7", "a cost budget calibrates the KL-ST router, write dmr-c0.7"),
                                          ("dmr", "expected full, quant")])
def test_bad_names_say_what_is_wrong(name, problem):
    with pytest.raises(ValueError, match=problem.replace(".", r"\.").replace("(", r"\(")):
        parse_policy(name)


def test_format_refuses_what_parse_refuses():
    with pytest.raises(ValueError, match="baselines are matched to a budget"):
        format_policy("oracle", "t", 0.5)
    with pytest.raises(ValueError, match="unknown kind 'dmr1'"):
        format_policy("dmr1", "k", 0.4)
