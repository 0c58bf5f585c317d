"""mproxy.control"""
