"""slimlm.export"""
