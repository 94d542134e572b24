"""The capacity planner: will this model fit on this GPU, and how fast will it run?"""
