"""Independent reference implementations (oracles) used to check tilepipe's processor.

``toolbox`` transcribes the lab's MATLAB PS-OCT toolbox chain step by step in NumPy;
``physics`` is a forward model of the instrument that writes the files the lab's acquisition
writes. Neither imports anything from tilepipe.
"""
