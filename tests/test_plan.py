import time

from factory.plan import Plan, RecipePlan, images_per_class, shard_seed


def test_plan_covers_every_image_once():
    plan = Plan([RecipePlan("a", 10, 4), RecipePlan("b", 3, 5)], [0, 2], ["x", "y", "z"], seed=1)
    assert len(plan) == 2 * 3 + 2 * 1
    shards = list(plan)
    assert [s.shard_id for s in shards] == list(range(len(plan)))
    for recipe, per_class in (("a", 10), ("b", 3)):
        for label in (0, 2):
            got = [s for s in shards if s.recipe == recipe and s.label == label]
            assert sum(s.num_images for s in got) == per_class
            keys = [s.key(i) for s in got for i in range(s.num_images)]
            assert len(set(keys)) == per_class and all("." not in k for k in keys)
    assert shards[0].class_name == "x" and shards[3].class_name == "z"
    assert len({s.seed for s in shards}) == len(shards)
    assert len({(s.recipe, s.name) for s in shards}) == len(shards)
    assert list(plan.recipe_range("b")) == [6, 7]


def test_seeds_are_a_function_of_config_and_shard():
    assert shard_seed(0, "cfg", 3, 1) == shard_seed(0, "cfg", 3, 1)
    assert shard_seed(0, "cfg", 3, 1) != shard_seed(1, "cfg", 3, 1)
    assert 0 <= shard_seed(5, "x", 0, 0) < 2**63


def test_ten_x_imagenet_plan_is_instant():
    t0 = time.perf_counter()
    n = images_per_class(10.0, None, 1_281_167, 1000)
    plan = Plan([RecipePlan("chamfer", n, 1000)], list(range(1000)), [f"n{i:08d}" for i in range(1000)], seed=0)
    last = plan.shard(len(plan) - 1)
    elapsed = time.perf_counter() - t0
    assert plan.num_images >= 12_811_670
    assert last.label == 999 and last.first_image + last.num_images == n
    print(f"13M-image plan: {len(plan)} shards in {elapsed * 1e3:.2f} ms")


def test_images_per_class_one_x():
    assert images_per_class(1.0, None, 1347, 10) == 135
    assert images_per_class(1.0, 7, 1347, 10) == 7
