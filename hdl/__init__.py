"""trilut.hdl"""
