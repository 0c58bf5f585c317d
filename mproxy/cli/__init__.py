"""
The C{mproxy} command line: parsing (L{parsing}), dispatch (L{main}), the
client commands (L{remote}), the deploy request they build (L{requests}) and
what they print (L{output}, L{streams}).
"""
