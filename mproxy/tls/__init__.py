"""mproxy.tls"""
