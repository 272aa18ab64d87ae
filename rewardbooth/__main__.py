from rewardbooth.cli import entry

entry()
