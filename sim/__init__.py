"""trilut.sim"""
