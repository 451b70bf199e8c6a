"""slimlm.serve"""
