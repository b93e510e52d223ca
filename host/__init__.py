"""trilut.host"""
