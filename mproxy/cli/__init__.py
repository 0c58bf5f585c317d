"""mproxy.cli"""
