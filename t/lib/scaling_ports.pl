# Free loopback ports in 26400-26599 (the scaling suites' range) for the processes the scaling suites start
# (receiver, Redis, a second gateway, the fake API server), chosen at random when the suite loads and exported as
# $TEST_NGINX_<NAME>_PORT, so that two runs of a suite at once (e.g. make test beside a single prove) do not collide.
use strict;
use warnings;
use IO::Socket::INET ();

my %taken;
sub scaling_ports {
    for my $name (@_) {
        my $port;
        for (1 .. 400) {
            my $p = 26400 + int(rand(200));
            next if $taken{$p};
            my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $p, Listen => 1) or next;
            close $s;
            $port = $p;
            last;
        }
        die "no free port in 26400-26599\n" unless $port;
        $taken{$port} = 1;
        $ENV{"TEST_NGINX_${name}_PORT"} = $port;
    }
}
1;
