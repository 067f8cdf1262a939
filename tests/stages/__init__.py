"""Tests of factory/stages/ (a package, so its module names do not collide with tests/ beside it)."""
