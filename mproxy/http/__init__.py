"""mproxy.http"""
